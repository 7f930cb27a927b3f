"""Model image of the catalogued star trails on a drift image.

Each trail is modelled as ``F_i * T(s - da_i, c - dc_i)`` in trail coordinates
(``s`` along the motion from the trail start, ``c`` across it), where the
template ``T(s, c) = f(s) * g(c - delta(s))`` is COMMON to all stars of the
CCD: sample ``k`` of every star refers to the same instant, so tracking
jitter along the track (brightness ripples), jitter across it (wiggles) and
transparency changes are the same function of ``s`` for every trail. ``f``,
``delta`` and the cross profile ``g`` are measured as medians over the bright
isolated stars (robust to a flash or a cosmic ray on one of them), after a
fit of those stars with the analytic moving-Gaussian template (used alone
when there are too few bright stars), and tabulated once on a 2-D (s, c)
grid (one bilinear look-up per stamp pixel). Per star only the flux and a
sub-pixel along/cross offset are fitted (linearised least squares,
vectorised over all stars with per-trail sums; offsets only for trails
bright on their own in the joint fit), then the fluxes of all trails jointly
(normal equations coupled only through shared pixels: a closed-form
amplitude for an isolated trail, one small sparse solve for the blend groups).

Subtracting this model leaves, on top of a trail, only what does not belong
to the star's smooth trail: a millisecond flash is a PSF-shaped bump there.
The model amplitude is deliberately not free per sample: a per-sample fit
would absorb the flash.

The per-entry passes (stamps and data, pixel pairs, template look-ups, the
fits' per-trail sums, the model image) are compiled kernels
(:mod:`._kernels`): ~1e6 entries per full-size CCD.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve
from scipy.ndimage import gaussian_filter1d as _gf1
from scipy.special import ndtr

from . import _kernels as _k
from ._kernels import stamp_pixels

__all__ = ["TrailPixels", "TrailTemplate", "trail_pixels", "fit_trails", "refit_fluxes"]

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_NO_IDX = np.zeros(0, np.int64)  # (empty arguments of the kernels: "not used")
_NO_F32 = np.zeros(0, np.float32)


def ndi_gaussian(a, sigma):
    return _gf1(a, sigma, mode="nearest")


@dataclass
class TrailPixels:
    """Pixels of the stamps of all trails (flattened, one entry per pixel and trail)."""

    star: np.ndarray  # int64 index of the trail
    pix: np.ndarray  # flat image index
    s: np.ndarray  # along-track coordinate from the trail start (px)
    c: np.ndarray  # cross-track coordinate (px)
    n: int  # number of trails
    counts: np.ndarray | None = None  # entries per trail (as made by trail_pixels: entries sorted by trail)


def trail_pixels(x0, y0, ux, uy, length, shape, half_width):
    """Collect the pixels within ``half_width`` of each trail segment.

    Parameters
    ----------
    x0, y0 : ndarray
        Trail starts (0-based px).
    ux, uy : ndarray
        Unit direction of each trail.
    length : ndarray
        Trail lengths (px).
    shape : (ny, nx)
    half_width : float
        Half-width of the stadium around the segment (px).

    Returns
    -------
    TrailPixels
        Entries sorted by trail; ``s``/``c`` in float32 (one compiled pass:
        :func:`._kernels.stamp_pixels`, which also gathers the data for
        :func:`fit_trails`).
    """
    n = len(x0)
    if n == 0:
        e = np.zeros(0, np.float32)
        return TrailPixels(e.astype(np.int64), e.astype(np.int64), e, e, 0)
    star, pix, s, c, _, _, cnt = stamp_pixels(x0, y0, ux, uy, length, shape, half_width, np.zeros(0, np.float32))
    return TrailPixels(star, pix, s, c, n, cnt)


class TrailTemplate:
    """Common unit-flux trail template on tabulated grids.

    ``T(s, c) = f(s) * g((c - delta(s)) * k(s)) * k(s)`` with ``k = 1/(1 + eps(s))``:
    along-track profile ``f`` (unit integral), cross offset ``delta`` and
    cross-width scale ``1 + eps`` as functions of the along-track position
    (i.e. of time), and the cross profile ``g`` (unit integral).
    """

    def __init__(self, s0, ds, f, delta, c0, dc, g, eps=None):
        self.s0, self.ds = float(s0), float(ds)
        self.f = np.array(f, float)
        self.delta = np.array(delta, float)
        self.c0, self.dc = float(c0), float(dc)
        self.g = np.array(g, float)
        for t in (self.f, self.delta, self.g):
            t[0] = t[-1] = 0.0
        eps = np.zeros_like(self.f) if eps is None else np.clip(np.array(eps, float), -0.5, 0.5)
        self.eps = eps
        self.k = 1.0 / (1.0 + eps)
        self.fp = np.gradient(self.f, self.ds)
        self.gp = np.gradient(self.g, self.dc)
        self.has_width = bool(np.any(eps != 0))
        self.cap = None
        self._t2 = None
        self._fg = None  # (grid, f g, delta) of the last grid evaluated (see _evaluate_grid)

    def set_caps(self, s0, ds, c0, dc, table, s_in_lo, s_in_hi):
        """2-D correction (unit-flux) at the trail ends: used where s < s_in_lo or s > s_in_hi."""
        self.cap = (float(s0), float(ds), float(c0), float(dc), np.asarray(table, np.float32), float(s_in_lo),
                    float(s_in_hi))
        self._t2 = None

    def _cap(self, s, c):
        s0, ds, c0, dc, tab, lo, hi = self.cap
        out = np.zeros(s.shape, np.float32)
        m = np.flatnonzero((s < lo) | (s > hi))
        if len(m) == 0:
            return out
        ns, nc = tab.shape
        u = np.clip((s[m] - s0) / ds, 0.0, ns - 1.001)
        v = np.clip((c[m] - c0) / dc, 0.0, nc - 1.001)
        i = u.astype(np.int32)
        j = v.astype(np.int32)
        fu = (u - i).astype(np.float32)
        fv = (v - j).astype(np.float32)
        out[m] = (tab[i, j] * (1 - fu) * (1 - fv) + tab[i + 1, j] * fu * (1 - fv) + tab[i, j + 1] * (1 - fu) * fv
                  + tab[i + 1, j + 1] * fu * fv)
        return out

    @property
    def c_max(self):
        """Largest |c| where the cross profile is tabulated."""
        return -self.c0

    @classmethod
    def analytic(cls, length, sigma, half_width, ds=0.25, dc=0.1):
        """Uniformly moving Gaussian: erf ramps along, Gaussian across."""
        s = np.arange(-half_width - 2, length + half_width + 2 + ds, ds)
        f = (ndtr(s / sigma) - ndtr((s - length) / sigma)) / length
        c = np.arange(-half_width - 2, half_width + 2 + dc, dc)
        g = np.exp(-0.5 * (c / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
        return cls(s[0], ds, f, np.zeros_like(f), c[0], dc, g)

    def _lookup(self, table, x0, dx, x):
        """Linear interpolation of ``table`` (grid ``x0 + dx * k``) at ``x``; a tuple of tables: a list of results."""
        # tables are zero at both ends (f, delta, g), so clipping the index gives 0 outside
        tables = table if isinstance(table, tuple) else (table,)
        n = len(tables[0])
        dt = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        u = (np.asarray(x, dt) - dt.type(x0)) * dt.type(1.0 / dx)
        np.clip(u, 0.0, n - 1.001, out=u)
        i = u.astype(np.intp)  # intp: fancy indexing with int32 indices converts them on every gather
        u -= np.floor(u)  # = u - i exactly, without a mixed float/int (float64) loop
        i1 = i + 1
        out = []
        for tab in tables:
            t = tab.astype(dt, copy=False)
            a = t[i]
            b = t[i1]
            b -= a
            b *= u
            b += a
            out.append(b)
        return out if isinstance(table, tuple) else out[0]

    def _table2d(self, pad=1.5):
        """The template (f, delta, width, end caps) tabulated once on the (s, c) grid ``ds`` x ``dc``."""
        if self._t2 is None:
            ns = len(self.f)
            c_lo = self.c0 - pad
            nc = int(round((-2.0 * self.c0 + 2.0 * pad) / self.dc)) + 1
            sg = self.s0 + self.ds * np.arange(ns)
            cg = c_lo + self.dc * np.arange(nc)
            T = self._evaluate_grid(sg, cg)
            T[[0, -1], :] = 0.0
            T[:, [0, -1]] = 0.0
            T = T.astype(np.float32)
            # the bilinear coefficients of each grid cell side by side (16 bytes): one gather per entry in
            # evaluate(); T = c0 + c1 v + u (c2 + c3 v) with u, v the fractional cell position along s, c
            P = np.zeros((ns, nc, 4), np.float32)
            T00, T01, T10, T11 = T[:-1, :-1], T[:-1, 1:], T[1:, :-1], T[1:, 1:]
            P[:-1, :-1, 0] = T00
            P[:-1, :-1, 1] = T01 - T00
            P[:-1, :-1, 2] = T10 - T00
            P[:-1, :-1, 3] = (T11 - T10) - (T01 - T00)
            self._t2 = (c_lo, ns, nc, P.reshape(-1, 4))
        return self._t2

    def _kernel_args(self):
        """The table and the float32 constants of :func:`._kernels.template_eval` (as ``_evaluate_block`` used them)."""
        c_lo, ns, nc, tab = self._table2d()
        f32 = np.float32
        return (tab, f32(self.s0), f32(1.0 / self.ds), f32(ns - 1.001), f32(c_lo), f32(1.0 / self.dc),
                f32(nc - 1.001), nc)

    def evaluate(self, s, c, derivatives=False, shift=None):
        """Template value (and d/ds, d/dc) at trail coordinates (float32).

        One bilinear look-up in the 2-D table of the template (the cell's 4
        bilinear coefficients stored side by side; the derivatives are those
        of the bilinear interpolant), instead of 5-7 separate 1-D look-ups per
        entry; compiled (:func:`._kernels.template_eval`). ``shift = (star,
        da, dc)``: evaluated at ``(s - da[star], c - dc[star])`` (float32
        offsets per trail), without shifted copies of ``s`` and ``c``.
        """
        shp = np.shape(s)
        s = np.ascontiguousarray(np.ravel(s), np.float32)
        c = np.ascontiguousarray(np.ravel(c), np.float32)
        n = len(s)
        T = np.empty(n, np.float32)
        Ts = np.empty(n if derivatives else 0, np.float32)
        Tc = np.empty(n if derivatives else 0, np.float32)
        if shift is None:
            star, da, dc = _NO_IDX, _NO_F32, _NO_F32
        else:
            star, da, dc = shift
            star = np.asarray(star, np.int64)
            da = np.asarray(da, np.float32)
            dc = np.asarray(dc, np.float32)
        _k.template_eval(s, c, star, da, dc, *self._kernel_args(), T, Ts, Tc)
        if not derivatives:
            return T.reshape(shp)
        return T.reshape(shp), Ts.reshape(shp), Tc.reshape(shp)

    def _evaluate_grid(self, sg, cg):
        """``_evaluate_direct`` on the grid ``sg`` x ``cg`` (same values); along-track tables looked up per row.

        The separable part ``f g`` is kept for the grid: setting the end caps
        afterwards (they do not change ``f``, ``delta``, ``eps``, ``g``) only adds
        their correction to it.
        """
        ns, nc = len(sg), len(cg)
        C = np.broadcast_to(cg[None, :], (ns, nc))
        key = (sg[0], sg[-1], ns, cg[0], cg[-1], nc)
        if self._fg is not None and self._fg[0] == key:
            T, dl = self._fg[1], self._fg[2]
        else:
            f = self._lookup(self.f, self.s0, self.ds, sg)[:, None]
            dl = self._lookup(self.delta, self.s0, self.ds, sg)[:, None]
            if not self.has_width and not dl.any():
                g = self._lookup(self.g, self.c0, self.dc, cg)[None, :] * 1.0  # (every row the same: one look-up)
            else:
                if self.has_width:
                    k = self._lookup(self.k, self.s0, self.ds, sg)[:, None]
                    cc = (C - dl) * k
                else:
                    k = 1.0
                    cc = C - dl
                g = self._lookup(self.g, self.c0, self.dc, cc.ravel()).reshape(ns, nc) * k
            T = f * g
            self._fg = (key, T, dl)
        if self.cap is not None:
            return T + self._cap(np.repeat(sg, nc), (C - dl).ravel()).reshape(ns, nc)
        return T.copy()  # (the kept product is not handed out)

    def _evaluate_direct(self, s, c, derivatives=False):
        """Template value (and d/ds, d/dc) from the 1-D tables (used to fill the 2-D table)."""
        f = self._lookup(self.f, self.s0, self.ds, s)
        dl = self._lookup(self.delta, self.s0, self.ds, s)
        if self.has_width:
            k = self._lookup(self.k, self.s0, self.ds, s)
            cc = (c - dl) * k
        else:
            k = 1.0
            cc = c - dl
        g = self._lookup(self.g, self.c0, self.dc, cc) * k
        T = f * g
        if self.cap is not None:
            T = T + self._cap(s, c - dl)
        if not derivatives:
            return T
        fp = self._lookup(self.fp, self.s0, self.ds, s)
        gp = self._lookup(self.gp, self.c0, self.dc, cc) * (k * k)
        return T, fp * g, f * gp


class _Runs:
    """Per-trail sums over entries that come in one contiguous run per trail (as in every :class:`TrailPixels`).

    ``np.add.reduceat`` over the runs is ~10x faster than ``np.bincount`` with
    weights; falls back to ``np.bincount`` if a trail's entries are not contiguous.
    """

    def __init__(self, star, n, runs=None):
        """``runs``: ``(ids, lengths)`` of the runs in entry order if known (each trail once; no scan of ``star``)."""
        self.star = np.asarray(star)
        self.n = int(n)
        if runs is not None and len(self.star):
            ids, ln = (np.asarray(v) for v in runs)
            nz = ln > 0
            self.ids = ids[nz]
            self.starts = np.concatenate([[0], np.cumsum(ln[nz])[:-1]])
            self.ok = True
        elif len(self.star):
            self.starts = np.concatenate([[0], np.flatnonzero(self.star[1:] != self.star[:-1]) + 1])
            self.ids = self.star[self.starts]
            self.ok = len(np.unique(self.ids)) == len(self.ids)
        else:
            self.ok = False

    def entries(self, select):
        """Indices of the entries of the trails where ``select`` (bool per trail) is True, ascending."""
        if not self.ok:
            return np.flatnonzero(select[self.star])
        ends = np.append(self.starts[1:], len(self.star))
        k = np.flatnonzero(select[self.ids])
        st, ln = self.starts[k], ends[k] - self.starts[k]
        tot = int(ln.sum())
        if tot == 0:
            return np.zeros(0, np.int64)
        off = np.repeat(st - np.concatenate([[0], np.cumsum(ln)[:-1]]), ln)
        return off + np.arange(tot)

    def sum(self, weights):
        """``np.bincount(star, weights, minlength=n)`` (float64)."""
        if not self.ok:
            return np.bincount(self.star, weights=weights, minlength=self.n)
        out = np.zeros(self.n)
        out[self.ids] = np.add.reduceat(np.asarray(weights), self.starts, dtype=np.float64)
        return out


def _masked_in_core(tp, w, c_max):
    """Number of masked entries (``w == 0``) with ``|c| <= c_max`` per trail (float, as a per-trail sum)."""
    z = np.flatnonzero(w == 0)
    z = z[np.abs(tp.c[z]) <= c_max]
    return np.bincount(tp.star[z], minlength=tp.n).astype(np.float64)


def _fit(tp, d, w, tmpl, F, da, dc, fit_off, n_iter=2, max_off=1.0, noise=None, first=None):
    """Linearised least squares of (F, da, dc) per star; offsets only where ``fit_off``.

    ``d`` must already have the neighbours' models subtracted. With ``noise =
    (sky_sigma, gain)``, pixels more than 5 sigma from the current model (a
    flash or a cosmic ray on the trail) are left out, so they do not pull the
    offsets. ``first``: ``tmpl.evaluate(s, c, derivatives=True)`` at the
    current offsets if already computed (used by the first iteration).
    """
    n = tp.n
    f32 = np.float32
    targs = tmpl._kernel_args()
    robust = noise is not None
    sky2, gain = (f32(noise[0] ** 2), f32(noise[1])) if robust else (f32(0.0), f32(1.0))
    st = np.asarray(tp.star, np.int64)
    for it in range(n_iter):
        # template, robust weights, the nine products (float32; float64 where d is) and their per-trail sums
        # (float64), in one compiled pass (:func:`._kernels.fit_sums`)
        S = np.zeros((9, n))
        ft = first if (it == 0 and first is not None) else (_NO_F32, _NO_F32, _NO_F32)
        _k.fit_sums(tp.s, tp.c, st, d, w, da.astype(f32), dc.astype(f32), F.astype(f32), *targs, *ft, robust, sky2,
                    gain, S)
        a00, a01, a02, a11, a12, a22, b0, b1, b2 = S
        A = np.empty((n, 3, 3))
        A[:, 0, 0], A[:, 0, 1], A[:, 0, 2] = a00, a01, a02
        A[:, 1, 0], A[:, 1, 1], A[:, 1, 2] = a01, a11, a12
        A[:, 2, 0], A[:, 2, 1], A[:, 2, 2] = a02, a12, a22
        b = np.stack([b0, b1, b2], axis=1)
        step = np.zeros((n, 3))
        ok3 = fit_off & (a00 > 0) & (a11 > 0) & (a22 > 0)
        if ok3.any():
            Aa = A[ok3] + np.eye(3)[None] * 1e-9 * np.maximum(A[ok3].max(axis=(1, 2)), 1e-30)[:, None, None]
            try:
                step[ok3] = np.linalg.solve(Aa, b[ok3][..., None])[..., 0]
            except np.linalg.LinAlgError:
                ok3 = np.zeros(n, bool)
        ok1 = ~ok3 & (a00 > 0)
        step[ok1, 0] = b0[ok1] / a00[ok1]
        F = F + step[:, 0]
        da = np.clip(da + np.clip(step[:, 1], -0.5, 0.5), -max_off, max_off)
        dc = np.clip(dc + np.clip(step[:, 2], -0.5, 0.5), -max_off, max_off)
        da[~fit_off] = 0.0
        dc[~fit_off] = 0.0
    return F, da, dc


def _pixel_index(pix, npix):
    """``rep[e]``: one entry index per distinct pixel (the last entry on it), for every entry ``e`` (int32)."""
    return _pixel_pairs(pix, npix)[0]


def _pixel_pairs(pix, npix):
    """:func:`_pixel_index` and :func:`_pairs` of its result in one compiled pass: ``rep, (p1, p2)``."""
    rep, p1, p2 = _k.pixel_pairs(pix, np.empty(npix, np.int32))
    return rep, (p1, p2)


def _pairs(lab, size, last=None):
    """Every pair of entries with the same pixel label ``lab`` (labels < ``size``), each pair once.

    Pixels of two stamps (most shared pixels) give the pair (entry, last entry
    on the pixel) directly; then the pairs among the other entries of pixels
    of three or more stamps (:func:`._kernels.pixel_pairs`). ``last``: the
    last entry of each label, if known (then it is the label itself or the
    same pairs follow from it).
    """
    _, p1, p2 = _k.pixel_pairs(lab, np.empty(size, np.int32))
    return p1, p2


def _solve_fluxes(star, rep, ne, n, w, T, d, pairs=None, runs=None):
    """Simultaneous linear least-squares fluxes of all trails (normal equations; blends).

    Only pixels shared by two or more stamps couple trails: the diagonal of
    the normal matrix and the right-hand side are plain per-trail sums, the
    off-diagonal part comes from the (few) shared pixels alone. Trails that
    share no pixel get the closed-form amplitude ``sum(w T d) / sum(w T^2)``;
    only the coupled ones (blend groups) go to a small sparse solve.
    ``runs``: not used (kept for the callers; the per-trail sums are one
    compiled pass, :func:`._kernels.flux_sums`).
    """
    # v = T w and the per-trail sums of v^2 and v d (float64) in one compiled pass
    v = np.empty(len(T), np.result_type(T, w))
    diag = np.zeros(n)
    b = np.zeros(n)
    _k.flux_sums(T, w, d, np.asarray(star, np.int64), v, diag, b)
    dead = diag <= 0
    F = np.zeros(n)
    live = ~dead
    F[live] = b[live] / diag[live]
    p1, p2 = _pairs(rep, ne) if pairs is None else pairs
    if len(p1):
        pv = v[p1] * v[p2]
        off = pv != 0
        if off.any():
            r_, c_, v_ = star[p1[off]], star[p2[off]], pv[off]
            r_, c_, v_ = np.concatenate([r_, c_]), np.concatenate([c_, r_]), np.concatenate([v_, v_])
            grp = np.zeros(n, bool)
            grp[r_] = True
            grp &= live
            gi = np.flatnonzero(grp)
            if len(gi):
                pos = np.full(n, -1, np.int64)
                pos[gi] = np.arange(len(gi))
                k = (pos[r_] >= 0) & (pos[c_] >= 0)
                M = sp.csc_matrix((np.concatenate([v_[k], diag[gi]]),
                                   (np.concatenate([pos[r_[k]], np.arange(len(gi))]),
                                    np.concatenate([pos[c_[k]], np.arange(len(gi))]))), shape=(len(gi), len(gi)))
                F[gi] = spsolve(M, b[gi])
    return F, diag


def _subset(tp, idx):
    return TrailPixels(tp.star[idx], tp.pix[idx], tp.s[idx], tp.c[idx], tp.n)


def _sorted_by_group(key, values):
    """``(key, value)`` pairs sorted by ``key`` and, within a key, by ``value``: ``(keys, values)``.

    One float64 ``np.sort`` of ``key + scaled value`` (~3x faster than the
    argsort of the same numbers, and no gathers), decoded back: the values
    come back to ~1e-11 of their range (keys < 2**20 leave >= 30 bits for
    them), far below float32 rounding.
    """
    v = np.asarray(values, np.float64)
    k = np.asarray(key)
    lo, hi = float(np.min(v)), float(np.max(v))
    if not hi > lo:
        return np.sort(k), np.full(len(v), lo)
    scale = 0.5 / (hi - lo)
    comp = np.sort(k.astype(np.float64) + (v - lo) * scale)
    ks = comp.astype(np.int64)  # floor: the scaled value is in [0, 0.5]
    vs = comp - ks
    vs *= 1.0 / scale
    vs += lo
    return ks, vs


def _grouped_median(key, values, n_groups, min_count=5):
    """Median and its standard error (1.25 * 1.4826 MAD / sqrt(n)) of ``values`` grouped by integer ``key``.

    Vectorised with two sorts (no Python loop over groups); groups with fewer
    than ``min_count`` members get median 0 and error inf. Each sort is one
    float64 sort of ``key + scaled value`` (see :func:`_sorted_by_group`).
    (Half the interquartile range from the first sort instead of the MAD
    saved ~5 ms per CCD but lost the satellite of the small preset's
    end-to-end run: the end-cap corrections are sensitive to it.)
    """
    med = np.zeros(n_groups)
    err = np.full(n_groups, np.inf)
    if len(key) == 0:
        return med, err
    ks, vs = _sorted_by_group(key, values)
    cnt = np.bincount(ks, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    uniq = np.flatnonzero(cnt >= min_count)
    st, cn = start[uniq], cnt[uniq]
    m = 0.5 * (vs[st + (cn - 1) // 2] + vs[st + cn // 2])
    med[uniq] = m
    # MAD: same trick on |v - median of its group|
    gm = np.zeros(n_groups)
    gm[uniq] = m
    dev = np.abs(values - gm[key])
    _, ds_ = _sorted_by_group(key, dev)
    mad = 0.5 * (ds_[st + (cn - 1) // 2] + ds_[st + cn // 2])
    err[uniq] = 1.25 * 1.4826 * mad / np.sqrt(cn)
    return med, err


def _robust_median(a, axis=0):
    """Median over ``axis`` ignoring NaN, and its standard error (1.25 * 1.4826 MAD / sqrt(n))."""
    a = np.moveaxis(np.asarray(a, float), axis, 0)
    med = _nanmedian0(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mad = _nanmedian0(np.abs(a - med[None]))
    n = np.sum(np.isfinite(a), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = 1.25 * 1.4826 * mad / np.sqrt(n)
    err = np.where(n >= 3, err, np.inf)
    return med, err


def _nanmedian0(a):
    """``np.nanmedian(a, axis=0)`` by one sort (NaN sort last); NaN where a column is all NaN."""
    A = np.sort(a, axis=0)
    n = a.shape[0] - np.count_nonzero(np.isnan(a), axis=0)
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    out = (np.take_along_axis(A, lo[None], 0)[0] + np.take_along_axis(A, hi[None], 0)[0]) / 2.0
    return np.where(n > 0, out, np.nan)


def _shrink(value, err, smooth_px, step):
    """Smooth a noisy correction on the scale the PSF already imposes, then shrink it towards 0 by its noise.

    ``value * max(0, 1 - (err/|value|)^2)`` after Gaussian smoothing (of both value
    and error, the error reduced by the number of bins averaged): corrections
    that the data do not demand vanish, so an exact base template is not
    degraded by noise.
    """
    v = np.where(np.isfinite(value), value, 0.0)
    fin = np.isfinite(err) & (err > 0)
    if not fin.any():
        return np.zeros_like(v)
    e = np.where(fin, np.maximum(err, 0.1 * np.median(err[fin])), 1e30)
    wgt = 1.0 / e**2
    sig = max(smooth_px / step, 1e-3)
    vs = ndi_gaussian(v * wgt, sig) / np.maximum(ndi_gaussian(wgt, sig), 1e-300)
    neff = max(1.0, math.sqrt(2 * math.pi) * sig)
    es = 1.0 / np.sqrt(np.maximum(ndi_gaussian(wgt, sig), 1e-300) * neff)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.clip(1.0 - (es / np.abs(vs)) ** 2, 0.0, 1.0)
    return np.nan_to_num(vs * f)


def _bright_entries(tp, d, w, F, da, dc, bright):
    """The entries of the bright trails used by the template corrections (shared by both).

    Returns ``(bright, sel, stg, s, c, dsel)``: the bright trails with a
    positive finite flux, the indices of their unmasked entries, those
    entries' trails, along/cross coordinates at the trails' offsets (float64)
    and data.
    """
    bright = bright & (F > 0) & np.isfinite(F)
    sel = np.flatnonzero(bright[tp.star] & (w > 0))
    stg = tp.star[sel]
    s = (tp.s[sel] - da[stg]).astype(np.float64, copy=False)  # (float32 - float64: float64 already)
    c = (tp.c[sel] - dc[stg]).astype(np.float64, copy=False)
    return bright, sel, stg, s, c, d[sel]


def _empirical_template(tp, d, w, F, da, dc, bright, base, half_width, sigma_psf, ds=0.5, dcbin=0.25, pre=None):
    """Correct the analytic template with medians over bright stars.

    Works on the residuals from the analytic template (``d - F*T``), which are
    smooth, so binning them does not bias the steep parts of the profile
    (binning the raw column sums would, at the trail ends). Along-track:
    ``df(s) = median_i sum(r)/(F_i sum(g))``; cross offset:
    ``delta(s) = -median_i sum(r g')/(F_i sum(f g'^2))``; cross profile:
    ``dg(c) = median of r / (F f)`` over the interior of the trails.
    ``pre``: :func:`_bright_entries` of the same arguments if already computed.
    """
    bright, sel, stg, s, c, dsel = pre if pre is not None else _bright_entries(tp, d, w, F, da, dc, bright)
    if bright.sum() < 3 or not len(sel):
        return base
    ib = np.cumsum(bright) - 1
    st = ib[stg]
    nb = int(bright.sum())
    Fi = F[stg]
    s_lo = base.s0
    s_hi = base.s0 + base.ds * (len(base.f) - 1)
    nsb = int(np.ceil((s_hi - s_lo) / ds)) + 1
    # the per-(trail, bin) sums of the analytic template's residuals (one compiled pass; the same sums as
    # np.bincount of the per-entry products)
    sums = np.zeros((7, nb * nsb))
    fb = np.empty(len(s))
    _k.template_bins(np.ascontiguousarray(s, np.float64), np.ascontiguousarray(c, np.float64), st, Fi,
                     np.ascontiguousarray(dsel, np.float64), base.f, base.g, base.gp, float(base.s0), 1.0 / base.ds,
                     float(base.c0), 1.0 / base.dc, float(s_lo), float(ds), nsb, sums, fb)
    a11, a12, a22, r1, r2, num2, den2 = (x.reshape(nb, nsb) for x in sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        det = a11 * a22 - a12 * a12
        okd = det > 1e-6 * np.maximum(a11 * a22, 1e-300)
        dfi = np.where(okd, (a22 * r1 - a12 * r2) / det, r1 / a11)
        epi = np.where(okd, (a11 * r2 - a12 * r1) / det, np.nan)
        # rows with too little weight (partly off the CCD)
        full = a11 > 0.3 * np.max(a11, axis=1, keepdims=True)
        dfi[~full] = np.nan
        epi[~full] = np.nan
        dli = np.where(den2 > 0.2 * np.max(den2, axis=1, keepdims=True), -num2 / den2, np.nan)
    df, df_err = _robust_median(dfi)
    ep, ep_err = _robust_median(epi)
    dl, dl_err = _robust_median(dli)
    sgrid = s_lo + ds * np.arange(nsb)
    fgrid_b = base._lookup(base.f, base.s0, base.ds, sgrid)
    # real structure is smoothed by the PSF along the track: smooth on ~0.6 sigma, shrink by the noise
    sm = 0.6 * sigma_psf
    df = _shrink(df, df_err, sm, ds)
    df[:2] = 0.0
    df[-2:] = 0.0
    strong = fgrid_b > 0.3 * fgrid_b.max()
    dl = np.where(strong, np.clip(_shrink(np.where(strong, dl, np.nan), np.where(strong, dl_err, np.inf), sm, ds),
                                  -1.0, 1.0), 0.0)
    ep = np.where(strong, np.clip(_shrink(np.where(strong, ep, np.nan), np.where(strong, ep_err, np.inf), sm, ds),
                                  -0.3, 0.3), 0.0)
    # extend eps flat into the ramps (width does not change at the trail ends)
    if strong.any():
        i0, i1 = np.flatnonzero(strong)[[0, -1]]
        ep[:i0] = ep[i0]
        ep[i1 + 1:] = ep[i1]
    df = np.clip(df, -0.5 * base.f.max(), 0.5 * base.f.max())
    sfine = base.s0 + base.ds * np.arange(len(base.f))
    f_new = base.f + np.interp(sfine, sgrid, df)
    delta = np.interp(sfine, sgrid, dl)
    eps = np.interp(sfine, sgrid, ep)
    # cross profile: interior pixels, with the corrected f and delta
    interior = np.flatnonzero(fb > 0.6 * fgrid_b.max())
    si = s[interior]  # (the corrected tables are needed on these entries only)
    fs = np.interp(si, sfine, f_new)
    dls = np.interp(si, sfine, delta)
    ks = 1.0 / (1.0 + np.interp(si, sfine, eps))
    cc = (c[interior] - dls) * ks
    gbi = base._lookup(base.g, base.c0, base.dc, cc)
    # residual in the frame scaled to the mean width: r/(F f k) is a sample of dg(cc)
    Fii = Fi[interior]
    q = (dsel[interior] / ks - Fii * fs * gbi) / (Fii * fs)
    c_lo = base.c0
    nc = len(base.g)
    nbin = int(np.ceil((nc - 1) * base.dc / dcbin)) + 1
    cb2 = np.clip(np.rint((cc - c_lo) / dcbin).astype(np.int64), 0, nbin - 1)
    dg, dg_err = _grouped_median(cb2, q, nbin, min_count=20)
    dg = np.where(np.isfinite(dg_err), dg, np.nan)
    dg = np.where(np.isfinite(dg), _shrink(dg, dg_err, 0.3 * sigma_psf, dcbin), np.nan)
    cgrid2 = c_lo + dcbin * np.arange(nbin)
    cgrid = base.c0 + base.dc * np.arange(nc)
    okg = np.isfinite(dg)
    if okg.sum() > 10:
        dgi = np.clip(np.interp(cgrid, cgrid2[okg], dg[okg], left=0.0, right=0.0), -0.5 * base.g.max(),
                      0.5 * base.g.max())
        g = base.g + dgi
        g = np.where(np.abs(cgrid) <= half_width, g, 0.0)
    else:
        g = base.g
    return TrailTemplate(base.s0, base.ds, f_new, delta, base.c0, base.dc, g, eps)


def _cap_correction(tp, d, w, F, da, dc, bright, tmpl, length, half_width, cap_px, ds=0.5, dcb=0.5, pre=None):
    """Median residual (per unit flux) of bright stars near the trail ends, on an (s, c) grid.

    The separable template ``f(s) g(c)`` is exact in the interior of a trail but
    not at its ends for a non-Gaussian PSF (the end cap is the PSF's own 2-D
    shape, whose wings a product of marginals does not reproduce).
    ``pre``: :func:`_bright_entries` of the same arguments if already computed.
    """
    bright, sel, st, s, c, dsel = pre if pre is not None else _bright_entries(tp, d, w, F, da, dc, bright)
    if bright.sum() < 3 or len(sel) == 0:
        return
    lo, hi = cap_px, length - cap_px
    m = (s < lo + 1.0) | (s > hi - 1.0)
    if not m.any():
        return
    T = tmpl.evaluate(s[m].astype(np.float32), c[m].astype(np.float32))
    r = (dsel[m] - F[st[m]] * T) / F[st[m]]
    dl = tmpl._lookup(tmpl.delta, tmpl.s0, tmpl.ds, s[m])
    s0 = tmpl.s0
    s1 = tmpl.s0 + tmpl.ds * (len(tmpl.f) - 1)
    c0 = -half_width - 1.0
    ns = int(np.ceil((s1 - s0) / ds)) + 1
    nc = int(np.ceil(2 * (half_width + 1.0) / dcb)) + 1
    ib = np.clip(np.rint((s[m] - s0) / ds).astype(np.int64), 0, ns - 1)
    jb = np.clip(np.rint((c[m] - dl - c0) / dcb).astype(np.int64), 0, nc - 1)
    key = ib * nc + jb
    tab, err = _grouped_median(key, r, ns * nc, min_count=5)
    tab = tab.reshape(ns, nc)
    err = err.reshape(ns, nc)
    # smooth over 3x3 bins (error / 3), keep only what is significant
    from scipy.ndimage import uniform_filter as _uf

    fin = np.isfinite(err) & (err > 0)
    if not fin.any():
        return
    err = np.maximum(err, 0.1 * np.median(err[fin]))  # bins of identical values (masked pixels) get no weight boost
    wgt = np.where(np.isfinite(err), 1.0 / err**2, 0.0)
    tw = _uf(tab * wgt, size=3, mode="constant")
    ww = _uf(wgt, size=3, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        tab = np.where(ww > 0, tw / ww, 0.0)
        es = np.where(ww > 0, 1.0 / np.sqrt(ww * 9.0), np.inf)
        tab = tab * np.clip(1.0 - (es / np.abs(tab)) ** 2, 0.0, 1.0)
    tab = np.clip(np.nan_to_num(tab), -0.3 * tmpl.g.max() * tmpl.f.max(), 0.3 * tmpl.g.max() * tmpl.f.max())
    sg = s0 + ds * np.arange(ns)
    tab[(sg >= lo) & (sg <= hi), :] = 0.0
    tab[:, [0, -1]] = 0.0
    tab[[0, -1], :] = 0.0
    tmpl.set_caps(s0, ds, c0, dcb, tab, lo, hi)


@dataclass
class TrailFit:
    """Result of :func:`fit_trails`."""

    model: np.ndarray  # float32 image
    flux: np.ndarray  # per trail, ADU
    flux_err: np.ndarray
    d_along: np.ndarray
    d_cross: np.ndarray
    n_masked: np.ndarray  # masked pixels in each trail's core
    template: TrailTemplate
    pixels: TrailPixels
    empirical: bool
    bright: np.ndarray
    half_width_px: float = 0.0
    sigma_psf: float = 0.0
    T: np.ndarray | None = None  # template value of each entry of ``pixels`` (offsets applied)
    bkg: np.ndarray | None = None  # local background subtracted from each trail's pixels (ADU)
    rep: np.ndarray | None = None  # per entry of ``pixels``: the entry representing its pixel (see _pixel_index)
    pairs: tuple | None = None  # (p1, p2): every pair of entries on the same pixel (see _pairs)
    w: np.ndarray | None = None  # weight (0 masked, 1 used) of each entry of ``pixels`` in the final fit


def _faint_half_width(snr, hw, sigma_psf, faint_snr):
    """Stamp half-width per trail: ``hw`` (bright), ``ceil(3 sigma)`` or ``ceil(2.5 sigma)`` (faint; float32).

    The model light a stamp leaves out is that of the wings beyond its
    half-width; for a trail of aperture S/N below ``faint_snr[0]``
    (``faint_snr[1]``) it is a fraction of what a trail just below the wide-
    stamp threshold leaves beyond ``hw``, far below the sky noise per pixel,
    while the stamp (and every per-pixel step of the fit) is 20-30 % smaller.
    Never below ``2 sigma_psf`` (the core where masked pixels are counted).
    """
    h = np.full(len(snr), hw, np.float32)
    lo, hi = faint_snr
    h1 = min(hw, max(math.ceil(3.0 * sigma_psf), math.ceil(2.0 * sigma_psf)))
    h0 = min(h1, max(math.ceil(2.5 * sigma_psf), math.ceil(2.0 * sigma_psf)))
    h[snr < hi] = h1
    h[snr < lo] = h0
    return h


def fit_trails(resid0, bad, x0, y0, x1, y1, *, sigma_psf, sky_sigma, half_width=None, min_bright=6,
               bright_snr=50.0, max_bright=150, wide_snr=150.0, offset_snr=250.0, analytic_length=None, gain=None,
               template_passes=1, faint_snr=(25.0, 50.0)):
    """Fit and render the common-template model of all trails.

    Parameters
    ----------
    resid0 : ndarray float32 (ny, nx)
        Sky-subtracted image (ADU).
    bad : ndarray bool or None
        Pixels excluded from fits (saturated, bad, cosmic rays, streaks).
    x0, y0, x1, y1 : ndarray
        Trail start and end (px).
    sigma_psf : float
        Gaussian sigma of the PSF (px).
    sky_sigma : float
        Sky noise per pixel (ADU).
    bright_snr : float
        Stars above this S/N get sub-pixel offsets and build the template.
    faint_snr : (float, float)
        Stars with an aperture S/N below ``faint_snr[0]`` get stamps of
        half-width ``ceil(2.5 sigma_psf)``, below ``faint_snr[1]``
        ``ceil(3 sigma_psf)`` (instead of ``ceil(3 sigma_psf) + 1``): the
        light of a faint star beyond them is far below the noise.

    Returns
    -------
    TrailFit
    """
    ny, nx = resid0.shape
    noise = (float(sky_sigma), float(gain) if gain else 1e30)
    x0 = np.asarray(x0, float)
    y0 = np.asarray(y0, float)
    dxv = np.asarray(x1, float) - x0
    dyv = np.asarray(y1, float) - y0
    L = np.hypot(dxv, dyv)
    Lref = float(np.median(L)) if analytic_length is None else float(analytic_length)
    ok_len = L > 0
    ux = np.where(ok_len, dxv / np.where(ok_len, L, 1), 1.0)
    uy = np.where(ok_len, dyv / np.where(ok_len, L, 1), 0.0)
    L = np.where(ok_len, L, Lref)
    hw = float(half_width if half_width is not None else math.ceil(3.0 * sigma_psf) + 1.0)
    hw_big = max(hw, math.ceil(3.0 * FWHM_PER_SIGMA * sigma_psf))
    n = len(x0)
    base = TrailTemplate.analytic(Lref, sigma_psf, hw_big)
    flat_bad = None if bad is None else bad.ravel()
    flat = resid0.ravel()
    # entries of every stamp and the aperture fluxes (a box of half-width 1.5 sigma across the trail) counted
    # first, nothing stored (one compiled pass)
    npx, F, ncore = _k.stamp_aperture(x0, y0, ux, uy, L, (ny, nx), hw, flat, flat_bad, np.float32(1.5 * sigma_psf))
    if n == 0 or npx.sum() == 0:
        return TrailFit(np.zeros((ny, nx), np.float32), np.zeros(n), np.full(n, np.inf), np.zeros(n), np.zeros(n),
                        np.zeros(n, int), base, trail_pixels(x0, y0, ux, uy, L, (ny, nx), hw), False,
                        np.zeros(n, bool))
    F /= 0.866
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.nan_to_num(F * 0.866 / (sky_sigma * np.sqrt(ncore.astype(np.float64))))
    # bright stars: wider stamps (PSF wings beyond 3 sigma are significant)
    wide = snr > wide_snr
    wide &= hw_big > hw
    # faint stars: narrower stamps (their wings are below the noise; see _faint_half_width)
    hwt = _faint_half_width(snr, hw, sigma_psf, faint_snr)
    hwt[wide] = -1.0  # replaced by the wide stamps below
    # the stamps' entries and the data and weights on them, written once (compiled): every trail's entries with
    # |c| <= its half-width, then the wide stamps (the same entries in the same order as cutting the stamps of
    # half-width hw to hwt and appending the wide ones)
    iw = np.flatnonzero(wide)
    wargs = (x0[iw], y0[iw], ux[iw], uy[iw], L[iw], (ny, nx), hw_big)
    if len(iw):
        wcnt = _k.stamp_aperture(*wargs, _NO_F32, None, -1.0)[0]  # (counted only)
    size = int(npx[~wide].sum()) + (int(wcnt.sum()) if len(iw) else 0)  # (an upper bound: pages never written
    out = (np.empty(size, np.int64), np.empty(size, np.int64), np.empty(size, np.float32),  # are never touched)
           np.empty(size, np.float32), np.empty(size, flat.dtype), np.empty(size, np.float32))
    kcnt = _k.stamp_pixels(x0, y0, ux, uy, L, (ny, nx), hw, flat, flat_bad, c_limit=hwt, out=out)[-1]
    m = int(kcnt.sum())
    run_desc = (np.arange(n), kcnt)  # runs of the entries: every trail's kept entries, then the wide stamps
    if len(iw):
        wcnt = _k.stamp_pixels(*wargs, flat, flat_bad, ids=iw, out=out, start=m)[-1]
        m += int(wcnt.sum())
        npx[iw] = wcnt
        run_desc = (np.concatenate([np.arange(n), iw]), np.concatenate([kcnt, wcnt]))
    star_, pix_, s_, c_, d, w = (a[:m] for a in out)
    tp = TrailPixels(star_, pix_, s_, c_, n)
    ne = len(tp.pix)
    rep, pairs = _pixel_pairs(tp.pix, ny * nx)
    runs = _Runs(tp.star, n, runs=run_desc)
    n_masked = _masked_in_core(tp, w, 2.0 * sigma_psf)
    da = np.zeros(n)
    dc = np.zeros(n)
    # stamp pixel counts at the common half-width (wide stamps for the wide trails): a trail's stamp is
    # "full" (not cut by the CCD edge) at >= 90 % of the median
    full = npx >= 0.9 * np.median(npx[npx > 0])
    bright = (snr > bright_snr) & (n_masked == 0) & full
    if bright.sum() > max_bright:
        thr = np.sort(snr[bright])[-max_bright]
        bright &= snr >= thr
    tmpl = base
    empirical = False
    fit_off = snr > offset_snr
    cap_px = 2.0 * FWHM_PER_SIGMA * sigma_psf
    use = fit_off | bright
    if use.any():
        # the bright stars' entries, and the neighbours' light on their pixels (analytic model, aperture fluxes)
        eb = runs.entries(use)
        sub = _subset(tp, eb)
        wb = w[eb]
        # other trails' entries on the bright trails' pixels: the partners of bright entries among the pairs of
        # entries sharing a pixel (same set as marking the bright pixels in an image, without the image)
        pu1, pu2 = use[tp.star[pairs[0]]], use[tp.star[pairs[1]]]
        en_m = np.zeros(ne, bool)  # (their sorted distinct indices: a mark and one scan instead of np.unique's sort)
        en_m[pairs[1][pu1 & ~pu2]] = True
        en_m[pairs[0][pu2 & ~pu1]] = True
        en = np.flatnonzero(en_m)
        del en_m
        # analytic template at zero offsets, with derivatives: also the first iteration of the offset fit below
        Tb, Tsb, Tcb = base.evaluate(sub.s, sub.c, derivatives=True)
        # joint fluxes of the bright stars on their own pixels (blends among them)
        runs_b = _Runs(sub.star, n)
        Fb, sTb = _solve_fluxes(sub.star, rep[eb], ne, n, wb, Tb, d[eb], runs=runs_b)
        F = np.where(use, Fb, F)
        # the aperture S/N counts a bright neighbour's light (blends): offsets and the template only from
        # trails that are bright on their own
        with np.errstate(divide="ignore", invalid="ignore"):
            snr_j = np.nan_to_num(Fb * np.sqrt(sTb) / sky_sigma)
        fit_off = fit_off & (snr_j > offset_snr)
        bright = bright & (snr_j > bright_snr)
        Tn = base.evaluate(tp.s[en], tp.c[en])
        own_b = F[sub.star] * Tb
        # the data minus the other trails' light on each bright entry's pixel (one compiled pass; the same sums)
        db = _k.minus_neighbours(d, eb, rep, own_b, en, F[tp.star[en]] * Tn, np.empty(ne), np.empty(ne))
        # local background of each bright trail from its own wings (the global sky is biased by the sources)
        r = db - own_b
        wing = (np.abs(sub.c) > 2.5 * sigma_psf) & (wb > 0) & (np.abs(r) < 4.0 * sky_sigma)
        nw = runs_b.sum(wing)
        bkg = np.where(nw >= 20, runs_b.sum(r * wing) / np.maximum(nw, 1), 0.0)
        db = db - bkg[sub.star]
        F, da, dc = _fit(sub, db, wb, base, F, da, dc, fit_off, n_iter=2, noise=noise, first=(Tb, Tsb, Tcb))
        del Tsb, Tcb
        if bright.sum() >= min_bright:
            pre = _bright_entries(sub, db, wb, F, da, dc, bright)
            tmpl = _empirical_template(sub, db, wb, F, da, dc, bright, base, hw_big, sigma_psf, pre=pre)
            _cap_correction(sub, db, wb, F, da, dc, bright, tmpl, Lref, hw_big, cap_px=cap_px, pre=pre)
            del pre
            if template_passes < 2:
                # offsets relative to the empirical template (the analytic one misses the common along-track
                # shift of the jitter: the instants of flashes on trails are read from these offsets)
                F, da, dc = _fit(sub, db, wb, tmpl, F, da, dc, fit_off, n_iter=1, noise=noise)
                empirical = True
        if bright.sum() >= min_bright and template_passes >= 2:
            # neighbours' light again, with the empirical template (Moffat-like wings of bright neighbours)
            Tb = tmpl.evaluate(sub.s, sub.c, shift=(sub.star, da, dc))
            Tn = tmpl.evaluate(tp.s[en], tp.c[en])
            own_b = F[sub.star] * Tb
            db = _k.minus_neighbours(d, eb, rep, own_b, en, F[tp.star[en]] * Tn, np.empty(ne), np.empty(ne))
            db -= bkg[sub.star]
            F, da, dc = _fit(sub, db, wb, tmpl, F, da, dc, fit_off, n_iter=2, noise=noise)
            tmpl = _empirical_template(sub, db, wb, F, da, dc, bright, base, hw_big, sigma_psf)
            _cap_correction(sub, db, wb, F, da, dc, bright, tmpl, Lref, hw_big, cap_px=cap_px)
            empirical = True
        # subtract each bright trail's local background from its pixels for the final joint fit
        d[eb] -= bkg[sub.star]  # (d is this function's own copy of the data)
        bkg_used = np.where(use, bkg, 0.0)
    else:
        bkg_used = np.zeros(n)
    # final: template with offsets, simultaneous fluxes of all trails (blends)
    # sub-pixel offsets: only trails with non-zero ones (all among the bright entries) are shifted
    # (evaluated at zero offsets for all, then again for the shifted trails' entries: no copies of s and c)
    # (zero offsets for most trails: s - 0 = s, the same values as evaluating only the moved trails shifted)
    T = tmpl.evaluate(tp.s, tp.c, shift=(tp.star, da, dc))
    model, F, ferr = _final(tp, rep, ne, n, w, T, d, sky_sigma, (ny, nx), pairs, runs)
    return TrailFit(model, F, ferr, da, dc, n_masked.astype(int), tmpl, tp, empirical, bright, hw_big,
                    float(sigma_psf), T, bkg_used, rep, pairs, w)


def _final(tp, rep, ne, n, w, T, d, sky_sigma, shape, pairs=None, runs=None):
    """Joint fluxes of all trails and the model image."""
    if pairs is None:
        pairs = _pairs(rep, ne, last=rep)
    F, sumT2 = _solve_fluxes(tp.star, rep, ne, n, w, T, d, pairs, runs)
    model = np.zeros(shape[0] * shape[1], np.float32)
    # stamps scattered; a pixel of several stamps gets the (float64) sum of theirs (:func:`._kernels.render_model`)
    _k.render_model(F.astype(np.float32), np.asarray(T, np.float32), np.asarray(tp.star, np.int64),
                    np.asarray(tp.pix, np.int64), rep, pairs[0], pairs[1], model, np.empty(ne))
    with np.errstate(divide="ignore", invalid="ignore"):
        ferr = sky_sigma / np.sqrt(sumT2)
    return model.reshape(shape), F, ferr


def refit_fluxes(fit, resid0, bad, *, sky_sigma, residual=False, inplace=False):
    """Joint fluxes again with more pixels excluded (e.g. a satellite streak), template and offsets kept.

    Costs one sparse solve instead of a full :func:`fit_trails` (the
    template, the sub-pixel offsets and the bright trails' local
    backgrounds do not depend on the few pixels a streak removes). Only the
    trails with a newly excluded pixel, closed over the trails sharing pixels
    with them (the joint fit couples trails only through shared pixels), are
    solved again and re-rendered; every other trail keeps its flux and its
    model pixels.

    Parameters
    ----------
    fit : TrailFit
    resid0 : ndarray float32 (ny, nx)
        Sky-subtracted image (ADU); with ``residual``, the residual
        ``sky-subtracted - fit.model`` instead: the data are read as
        ``resid0 + fit.model`` on the pixels refitted, and ``resid0`` is
        updated in place there (new residual, 0 where ``bad``), so a caller
        need not restore and re-subtract the whole image.
    bad : ndarray bool or None
        Pixels excluded (those of the first fit and the new ones).
    inplace : bool
        Update ``fit.model`` in place instead of a copy.
    """
    tp = fit.pixels
    if fit.T is None or tp.n == 0 or len(tp.pix) == 0:
        return fit
    ny, nx = resid0.shape
    ne = len(tp.pix)
    n = tp.n
    f32 = np.float32
    if fit.rep is None or fit.pairs is None:
        rep, pairs = _pixel_pairs(tp.pix, ny * nx)
    else:
        rep, pairs = fit.rep, fit.pairs
    w = np.ones(ne, f32) if bad is None else (~bad.ravel()[tp.pix]).astype(f32)
    runs = _Runs(tp.star, n)
    old_flat = fit.model.ravel()
    res_flat = resid0.ravel()
    if fit.w is None or not runs.ok:
        data = resid0 + fit.model if residual else resid0
        d = data.ravel()[tp.pix] - fit.bkg.astype(f32)[tp.star]
        model, F, ferr = _final(tp, rep, ne, n, w, fit.T, d, sky_sigma, (ny, nx), pairs, runs)
        if inplace:
            fit.model[...] = model
            model = fit.model
        if residual:
            np.subtract(data, model, out=resid0)
            if bad is not None:
                np.copyto(resid0, 0.0, where=bad)
        n_masked = _masked_in_core(tp, w, 2.0 * fit.sigma_psf).astype(int)
        return TrailFit(model, F, ferr, fit.d_along, fit.d_cross, n_masked, fit.template, tp, fit.empirical,
                        fit.bright, fit.half_width_px, fit.sigma_psf, fit.T, fit.bkg, rep, pairs, w)
    # trails with a changed weight, and (transitively) the trails sharing a pixel with them
    aff = np.zeros(n, bool)
    aff[tp.star[np.flatnonzero(w != fit.w)]] = True
    s1, s2 = tp.star[pairs[0]], tp.star[pairs[1]]
    while True:
        grow = (aff[s1] != aff[s2])
        if not grow.any():
            break
        aff[s1[grow]] = True
        aff[s2[grow]] = True
    if not aff.any():
        return TrailFit(fit.model, fit.flux, fit.flux_err, fit.d_along, fit.d_cross, fit.n_masked, fit.template, tp,
                        fit.empirical, fit.bright, fit.half_width_px, fit.sigma_psf, fit.T, fit.bkg, rep, pairs, w)
    ea = runs.entries(aff)  # their entries: every entry on these pixels belongs to an affected trail
    pos = np.full(ne, -1, np.int64)
    pos[ea] = np.arange(len(ea))
    kp = aff[s1]  # pairs within the affected trails (both sides affected, by the closure)
    sub = _subset(tp, ea)
    pairs_a = (pos[pairs[0][kp]], pos[pairs[1][kp]])
    rep_a = pos[rep[ea]]
    data = res_flat[sub.pix]
    if residual:
        data += old_flat[sub.pix]  # the sky-subtracted data, as (residual + model) in float32
    d = data - fit.bkg.astype(f32)[sub.star]
    wa = w[ea]
    # the affected trails' model on their own pixels only: compact pixel labels (each entry's representative
    # entry among them) instead of a model image
    sub_c = TrailPixels(sub.star, rep_a, sub.s, sub.c, n)
    m_a, F_a, ferr_a = _final(sub_c, rep_a, len(ea), n, wa, fit.T[ea], d, sky_sigma, (1, len(ea)), pairs_a,
                              _Runs(sub.star, n))
    new_vals = m_a.ravel()[rep_a]  # model of each affected entry's pixel (only affected trails' light there)
    model = fit.model if inplace else fit.model.copy()
    model.ravel()[sub.pix] = new_vals
    if residual:
        res_flat[sub.pix] = np.where(wa > 0, data - new_vals, f32(0.0))
    F = np.where(aff, F_a, fit.flux)
    ferr = np.where(aff, ferr_a, fit.flux_err)
    n_masked = np.where(aff, _masked_in_core(sub, wa, 2.0 * fit.sigma_psf), fit.n_masked).astype(int)
    return TrailFit(model, F, ferr, fit.d_along, fit.d_cross, n_masked, fit.template, tp,
                    fit.empirical, fit.bright, fit.half_width_px, fit.sigma_psf, fit.T, fit.bkg, rep, pairs, w)
