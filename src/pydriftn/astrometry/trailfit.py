"""Sub-pixel fit of drift trails, vectorised over all trails of a CCD.

A trail is modelled as a line segment of the known drift direction convolved
with a Gaussian PSF. Every trail is resampled onto its own grid of ``p``
(along the drift) by ``q`` (across) samples and collapsed into two 1-D
profiles, which are fitted by batched Gauss-Newton (one small normal-equation
system per trail, solved for all trails at once with ``numpy.linalg.solve``):

* the **along-track profile** (sum across the trail) with
  ``h * [Phi((p - pa)/s) - Phi((p - pb)/s)] + b``: ``pa`` and ``pb`` are the
  points where the profile crosses half of its plateau, i.e. the trail start
  and end; a weak prior ties ``pb - pa`` to the expected length so that an
  edge outside the CCD (or masked) is set by the visible edge plus the known
  trail vector, never by the centroid of the visible part;
* the **cross-track profile** (mean along the plateau) with a Gaussian
  ``A * exp(-(q - qm)^2 / 2 s^2) + b``.

When the drift is within a few degrees of a pixel axis (DECam, and any drift
along RA or Dec on an unrotated CCD) the grid is that pixel axis, so samples
are whole pixels (no interpolation) and the small tilt is carried exactly in
the coordinate transform; otherwise the grid follows the drift direction and
pixels are bilinearly interpolated.

We wrote this instead of calling a generic optimiser per trail (e.g.
``scipy.optimize.least_squares``) because a full CCD holds ~2000 trails and the
budget is a fraction of a second: per-trail Python calls cost ~1 ms each.
Neighbouring trails are handled by subtracting the model of all other trails
before a star's own profiles are built (a Jacobi iteration of the joint fit):
on a whole-pixel grid pair by pair from the neighbours' models on their own
grids (:func:`neighbour_models`), otherwise from a rendered image
(:func:`render_trails`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.special import ndtr

from . import _kernels

log = logging.getLogger(__name__)

__all__ = ["TrailGrid", "make_grid", "fit_trails", "render_trails", "neighbour_models", "solve_fluxes", "measure_lsf",
           "FWHM_PER_SIGMA"]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: largest angle (deg) between drift and a pixel axis for whole-pixel sampling
AXIS_SNAP_DEG = 5.0


@dataclass(frozen=True)
class TrailGrid:
    """Sampling grid shared by all trails of a CCD.

    Attributes
    ----------
    ep, eq : (float, float)
        Unit vectors (pixels) of the grid axes ``p`` (along) and ``q`` (across).
    u : (float, float)
        Drift direction (unit vector).
    tan_phi, cos_phi : float
        Tilt of the drift relative to ``ep`` (0 when the grid follows the drift).
    length_px : float
        Expected trail length (pixels along the drift).
    sigma_px : float
        PSF Gaussian sigma (pixels).
    p_off, q_off : ndarray
        Integer sample offsets along and across.
    snapped : bool
        Whether the grid axes are pixel axes (whole-pixel samples).
    """

    ep: tuple
    eq: tuple
    u: tuple
    tan_phi: float
    cos_phi: float
    length_px: float
    sigma_px: float
    p_off: np.ndarray
    q_off: np.ndarray
    snapped: bool
    psf_w: tuple = (1.0,)
    psf_s: tuple = ()

    @property
    def mixture(self):
        """PSF line-spread function as (weights, sigmas) of concentric Gaussians."""
        if not self.psf_s:
            return np.array([1.0]), np.array([self.sigma_px])
        return np.asarray(self.psf_w, float), np.asarray(self.psf_s, float)

    @property
    def length_p(self) -> float:
        """Trail length projected on the ``p`` axis."""
        return self.length_px * self.cos_phi


def make_grid(direction, length_px, sigma_px, *, pad_sigma=3.0, half_width=None, psf=None) -> TrailGrid:
    """Build the sampling grid for trails of the given direction and length.

    Parameters
    ----------
    direction : (float, float)
        Unit drift vector in pixels (from :func:`pydriftn.geometry.trail_geometry`).
    length_px : float
        Trail length in pixels.
    sigma_px : float
        PSF sigma in pixels.
    pad_sigma : float
        Margin beyond each end, in PSF sigmas (plus 3 px).
    half_width : int, optional
        Half-width of the cross window (default ``ceil(3 sigma) + 1``).
    psf : (weights, sigmas), optional
        Gaussian-mixture line-spread function used for the flux solve and the
        rendered models (default: one Gaussian of ``sigma_px``); see
        :func:`measure_lsf`.
    """
    ux, uy = float(direction[0]), float(direction[1])
    norm = math.hypot(ux, uy)
    ux, uy = ux / norm, uy / norm
    ang = math.degrees(math.atan2(uy, ux))
    snapped = False
    ep = (ux, uy)
    for axis in ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)):
        dot = ux * axis[0] + uy * axis[1]
        if dot >= math.cos(math.radians(AXIS_SNAP_DEG)):
            ep = axis
            snapped = True
            break
    eq = (-ep[1], ep[0])
    cos_phi = ux * ep[0] + uy * ep[1]
    sin_phi = ux * eq[0] + uy * eq[1]
    tan_phi = sin_phi / cos_phi
    half_len = 0.5 * length_px * cos_phi + pad_sigma * sigma_px + 3.0
    na = int(math.ceil(half_len))
    nc = int(half_width) if half_width is not None else int(math.ceil(3.0 * sigma_px)) + 1
    log.debug("trail grid: angle %.3f deg, snapped=%s, %d x %d samples", ang, snapped, 2 * na + 1, 2 * nc + 1)
    return TrailGrid(
        ep=ep, eq=eq, u=(ux, uy), tan_phi=tan_phi, cos_phi=cos_phi, length_px=float(length_px),
        sigma_px=float(sigma_px), p_off=np.arange(-na, na + 1, dtype=float),
        q_off=np.arange(-nc, nc + 1, dtype=float), snapped=snapped,
        psf_w=tuple(float(w) for w in psf[0]) if psf is not None else (1.0,),
        psf_s=tuple(float(v) for v in psf[1]) if psf is not None else (),
    )


#: |z| beyond which scipy's ndtr returns exactly 1 (above) or 0 (below), by dtype (with a margin:
#: float32 results are 1.0 from z = 5.42 and 0.0 from z = -14.17; float64 1.0 from z = 8.29)
_NO_BAD = np.zeros((0, 0), bool)
_NO_NEIGHBOURS = np.zeros((0, 0, 0), np.float32)
#: trails per chunk of the compiled passes over (trail, p, q) temporaries (a chunk stays in the cache)
_CHUNK = 64

_NDTR_EXACT = {np.dtype(np.float32): (5.6, -14.5), np.dtype(np.float64): (8.5, -39.0)}


def _ndtr_along(z):
    """``scipy.special.ndtr(z)`` for ``z`` (n, m[, 1]) non-decreasing along axis 1 in every row, identical values.

    The along-track edge profiles are evaluated on windows reaching ~3 PSF
    sigmas beyond the trail ends, so most of their samples are where the
    normal CDF is exactly 1.0 (or 0.0) in the working precision: those
    columns (a suffix and a prefix, the same for all rows) are filled, and
    ``ndtr`` (~14 ns per value) is evaluated on the others only.
    """
    one_at, zero_at = _NDTR_EXACT.get(z.dtype, (np.inf, -np.inf))
    m = z.shape[1]
    if z.shape[0] == 0 or m == 0:
        return ndtr(z)
    zc = z.reshape(z.shape[0], m)
    # columns from c1 on: all rows 1.0; columns before c0: all rows 0.0 (one compiled pass; was
    # count_nonzero(zc.min(axis=0) >= one_at) and count_nonzero(zc.max(axis=0) <= zero_at))
    c0, c1 = _kernels.saturated_columns(zc, z.dtype.type(one_at), z.dtype.type(zero_at))
    c0, c1 = int(c0), int(c1)
    if c1 <= c0:
        return ndtr(z)
    out = np.empty_like(z)
    out[:, :c0] = 0.0
    out[:, c1:] = 1.0
    out[:, c0:c1] = ndtr(z[:, c0:c1])
    return out


def _sample(image, grid: TrailGrid, xa, ya, bad=None, dtype=float, want_inside=True):
    """Sample ``image`` on each trail's grid. Returns (values, valid, inside) of shape (n, np, nq).

    ``values`` has ``dtype`` (float64 by default, for the profile fits) and is 0 where
    not valid; ``inside`` (on the CCD) is None unless ``want_inside``.
    """
    ny, nx = image.shape
    if grid.snapped and image.dtype == np.float32 and np.dtype(dtype) in (np.dtype(np.float32), np.dtype(np.float64)):
        # whole-pixel grid: one compiled pass per sample (pixel, validity, on-CCD flag)
        n = xa.size
        n_p, n_q = grid.p_off.size, grid.q_off.size
        Pi = grid.p_off.astype(np.int64)[:, None]
        Qi = grid.q_off.astype(np.int64)[None, :]
        ox = np.ascontiguousarray(Pi * int(grid.ep[0]) + Qi * int(grid.eq[0]))  # (np, nq) pixel offsets
        oy = np.ascontiguousarray(Pi * int(grid.ep[1]) + Qi * int(grid.eq[1]))
        vals = np.empty((n, n_p, n_q), dtype)
        valid = np.empty((n, n_p, n_q), bool)
        inside = np.empty((n, n_p, n_q) if want_inside else (0, 0, 0), bool)
        m = _NO_BAD if bad is None else np.ascontiguousarray(bad, dtype=bool)
        _kernels.sample_snapped(np.ascontiguousarray(image), m, np.ascontiguousarray(xa, dtype=np.int64),
                                np.ascontiguousarray(ya, dtype=np.int64), ox, oy, vals, valid, inside)
        return vals, valid, (inside if want_inside else None)
    if grid.snapped:
        # whole-pixel grid: a trail's window is a rectangle of the image. Windows inside
        # the CCD are gathered whole from a sliding-window view (one block copy per
        # trail, ~7x cheaper than a gather through per-sample flat indices) and turned
        # to the (p, q) axes; the few windows reaching beyond the CCD get per-sample
        # indices with their bounds checked.
        n = xa.size
        n_p, n_q = grid.p_off.size, grid.q_off.size
        na, nc = (n_p - 1) // 2, (n_q - 1) // 2
        epx, epy = int(grid.ep[0]), int(grid.ep[1])
        eqx, eqy = int(grid.eq[0]), int(grid.eq[1])
        rx = na if epx else nc  # window half-sizes along x and y
        ry = nc if epx else na
        xi0 = xa.astype(np.int64)
        yi0 = ya.astype(np.int64)
        edge = (xi0 - rx < 0) | (xi0 + rx >= nx) | (yi0 - ry < 0) | (yi0 + ry >= ny)
        zero = np.zeros((), dtype)
        if nx > 2 * rx and ny > 2 * ry:
            # every window gathered at its anchor clipped into the CCD; the edge ones are redone below
            xc = np.clip(xi0, rx, nx - 1 - rx)
            yc = np.clip(yi0, ry, ny - 1 - ry)

            def windows(a):
                g = sliding_window_view(a, (2 * ry + 1, 2 * rx + 1))[yc - ry, xc - rx]  # (n, y, x)
                # sample (p, q) sits at x = xa + p epx + q eqx, y = ya + p epy + q eqy
                if epx:  # p along x (axis 2), q along y (axis 1)
                    return g[:, ::eqy, ::epx].transpose(0, 2, 1)
                return g[:, ::epy, ::eqx]  # p along y (axis 1), q along x (axis 2)

            if bad is None:
                valid = np.ones((n, n_p, n_q), bool)
                vals = np.empty((n, n_p, n_q), dtype)
                vals[...] = windows(image)
            else:  # (C-ordered outputs: a ufunc on the turned view would allocate them turned)
                valid = np.empty((n, n_p, n_q), bool)
                np.logical_not(windows(bad), out=valid)
                vals = np.zeros((n, n_p, n_q), dtype)
                np.copyto(vals, windows(image), where=valid)
        else:  # windows larger than the CCD: per-sample indices for all
            edge[:] = True
            valid = np.ones((n, n_p, n_q), bool)
            vals = np.zeros((n, n_p, n_q), dtype)
        inside = np.ones((n, n_p, n_q), bool) if want_inside else None
        ie = np.nonzero(edge)[0]
        if ie.size:
            Pi = grid.p_off.astype(np.int64)[:, None]
            Qi = grid.q_off.astype(np.int64)[None, :]
            ox = Pi * epx + Qi * eqx  # (np, nq) offsets
            oy = Pi * epy + Qi * eqy
            xi = xi0[ie, None, None] + ox[None]
            yi = yi0[ie, None, None] + oy[None]
            ins = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
            flat = np.clip(yi, 0, ny - 1) * nx + np.clip(xi, 0, nx - 1)
            if want_inside:
                inside[ie] = ins
            ok = ins if bad is None else (ins & ~np.take(bad.reshape(-1), flat))
            valid[ie] = ok
            vals[ie] = np.where(ok, np.take(image.reshape(-1), flat), zero)
        return vals, valid, inside
    P = grid.p_off[None, :, None]
    Q = grid.q_off[None, None, :]
    X = xa[:, None, None] + P * grid.ep[0] + Q * grid.eq[0]
    Y = ya[:, None, None] + P * grid.ep[1] + Q * grid.eq[1]
    if True:
        vals = ndimage.map_coordinates(image, [Y.ravel(), X.ravel()], order=1, mode="constant",
                                       cval=np.nan, prefilter=False).reshape(X.shape).astype(dtype, copy=False)
        inside = (X >= 0) & (X <= nx - 1) & (Y >= 0) & (Y <= ny - 1)
        valid = inside & np.isfinite(vals)
        if bad is not None:
            xi = np.clip(np.rint(X).astype(np.intp), 0, nx - 1)
            yi = np.clip(np.rint(Y).astype(np.intp), 0, ny - 1)
            valid &= ~bad[yi, xi]
    vals = np.where(valid, vals, 0.0)
    return vals, valid, (inside if want_inside else None)


def _solve(JtWJ, JtWr):
    k = JtWJ.shape[-1]
    diag = JtWJ.diagonal(axis1=1, axis2=2)  # (a view: the einsum "nii->ni" cost ~40 us per call)
    damp = 1e-9 * np.maximum(diag, 1e-30)
    A = JtWJ + damp[:, :, None] * np.eye(k)[None]
    try:
        return np.linalg.solve(A, JtWr[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.zeros_like(JtWr)
        for i in range(A.shape[0]):
            try:
                out[i] = np.linalg.solve(A[i], JtWr[i])
            except np.linalg.LinAlgError:
                pass
        return out


def _cov(JtWJ):
    k = JtWJ.shape[-1]
    eye = 1e-12 * np.eye(k)[None]
    try:
        return np.linalg.inv(JtWJ + eye * np.maximum(np.einsum("nii->n", JtWJ), 1e-30)[:, None, None])
    except np.linalg.LinAlgError:
        out = np.full_like(JtWJ, np.nan)
        for i in range(JtWJ.shape[0]):
            try:
                out[i] = np.linalg.inv(JtWJ[i])
            except np.linalg.LinAlgError:
                pass
        return out


def _fit_cross(vals, valid, var, grid, pm, pa, pb, qm, s, *, fit_sigma, n_iter):
    """Fit the cross-track profile. Returns qm, s, amp, cov(qm) and chi2."""
    sig = grid.sigma_px
    P = grid.p_off[None, :]
    lo = pa + 2.0 * sig
    hi = pb - 2.0 * sig
    short = hi - lo < 4.0
    lo = np.where(short, pm - 2.0, lo)
    hi = np.where(short, pm + 2.0, hi)
    inrange = ((P >= lo[:, None]) & (P <= hi[:, None])).astype(float)
    # valid: float 0/1; vals and var are zero on invalid samples
    n = np.einsum("npq,np->nq", valid, inrange)  # (n, nq)
    nn = np.maximum(n, 1)
    prof = np.einsum("npq,np->nq", vals, inrange) / nn
    pvar = np.einsum("npq,np->nq", var, inrange) / nn**2
    wt = np.where(n > 0, 1.0 / np.maximum(pvar, 1e-12), 0.0)
    pc = 0.5 * (lo + hi)  # p at which the cross centre is measured
    Q = grid.q_off[None, :]
    # qm refers to the trail centre pm; at pc the trail is offset by (pc - pm) tan(phi)
    shift = (pc - pm) * grid.tan_phi
    amp = np.maximum(prof.max(axis=1), 1e-3)
    b = np.zeros_like(pm)
    params = [amp, qm + shift, b] + ([s] if fit_sigma else [])
    for _ in range(n_iter):
        amp, q0, b = params[0], params[1], params[2]
        ss = params[3] if fit_sigma else s
        d = (Q - q0[:, None]) / ss[:, None]
        g = np.exp(-0.5 * d * d)
        model = amp[:, None] * g + b[:, None]
        J = [g, amp[:, None] * g * d / ss[:, None], np.ones_like(g)]
        if fit_sigma:
            J.append(amp[:, None] * g * d * d / ss[:, None])
        J = np.stack(J, axis=-1)
        r = prof - model
        JtW = J * wt[:, :, None]
        JtWJ = np.matmul(JtW.transpose(0, 2, 1), J)
        JtWr = np.einsum("nmi,nm->ni", JtW, r)
        step = _solve(JtWJ, JtWr)
        step[:, 1] = np.clip(step[:, 1], -1.0, 1.0)
        params[0] = params[0] + step[:, 0]
        params[1] = params[1] + step[:, 1]
        params[2] = params[2] + step[:, 2]
        if fit_sigma:
            params[3] = np.clip(params[3] + np.clip(step[:, 3], -0.3 * params[3], 0.3 * params[3]),
                                0.3 * sig, 4.0 * sig)
    amp, q0, b = params[0], params[1], params[2]
    ss = params[3] if fit_sigma else s
    d = (Q - q0[:, None]) / ss[:, None]
    g = np.exp(-0.5 * d * d)
    J = [g, amp[:, None] * g * d / ss[:, None], np.ones_like(g)]
    if fit_sigma:
        J.append(amp[:, None] * g * d * d / ss[:, None])
    J = np.stack(J, axis=-1)
    JtWJ = np.matmul((J * wt[:, :, None]).transpose(0, 2, 1), J)
    cov = _cov(JtWJ)
    r = prof - (amp[:, None] * g + b[:, None])
    dof = np.maximum((wt > 0).sum(axis=1) - J.shape[-1], 1)
    chi2 = (r * r * wt).sum(axis=1) / dof
    return q0 - shift, ss, amp, np.abs(cov[:, 1, 1]), chi2


def _fit_along(vals, valid, var, grid, qm, pa, pb, s, *, n_iter, length_prior_px, sums=None):
    """Fit the along-track profile. Returns pa, pb, h, b, covariance (4x4) and chi2."""
    Q = grid.q_off[None, None, :]
    P = grid.p_off[None, :]
    # cross coverage: fraction of the cross profile on valid samples, per p
    qc = qm[:, None, None] + (P[:, :, None] - 0.5 * (pa + pb)[:, None, None]) * grid.tan_phi
    # g = exp(-0.5 ((Q - qc) / s)^2) / (sqrt(2 pi) s): the exponent in one compiled pass, numpy's exp
    n, n_p = qc.shape[0], P.shape[1]
    # optimal weights across the trail, wq = g * valid (the PSF cross profile); valid: float 0/1,
    # vals and var are zero on invalid samples: sum wq g, sum wq, sum vals wq, sum var wq^2 in one pass
    # (by chunks of trails, so that the exponents stay in the cache)
    cov_q, nq, prof, pvar = (np.empty((n, n_p)) for _ in range(4))
    Qc = np.ascontiguousarray(grid.q_off, dtype=float)
    qc = np.ascontiguousarray(qc.reshape(n, n_p))
    s_c = np.ascontiguousarray(s, dtype=float)
    c = np.ascontiguousarray(_INV_SQRT_2PI / s, dtype=float)
    ebuf = np.empty((min(n, _CHUNK),) + vals.shape[1:])
    for i0 in range(0, n, _CHUNK):
        i1 = min(i0 + _CHUNK, n)
        e = ebuf[: i1 - i0]
        _kernels.cross_exponent(Qc, qc[i0:i1], s_c[i0:i1], e)
        np.exp(e, out=e)
        _kernels.cross_sums(e, c[i0:i1], valid[i0:i1], vals[i0:i1], var[i0:i1], cov_q[i0:i1], nq[i0:i1],
                            prof[i0:i1], pvar[i0:i1])
    wt = np.where(nq > 0, 1.0 / np.maximum(pvar, 1e-30), 0.0)
    L = grid.length_p
    h = np.maximum((prof * (cov_q > 0)).sum(axis=1) / np.maximum(L, 1.0), 1e-3)
    b = np.zeros_like(h)
    wprior = 1.0 / length_prior_px**2
    k = 4
    for it in range(n_iter + 1):
        za = (P - pa[:, None]) / s[:, None]
        zb = (P - pb[:, None]) / s[:, None]
        shape = _ndtr_along(za) - _ndtr_along(zb)
        pdf_a = np.exp(-0.5 * za * za) * _INV_SQRT_2PI / s[:, None]
        pdf_b = np.exp(-0.5 * zb * zb) * _INV_SQRT_2PI / s[:, None]
        # model, J^T W J and J^T W r in one compiled pass (J: d model / d(h, pa, pb, b))
        model = np.empty(shape.shape)
        JtWJ = np.empty((n, 4, 4))
        JtWr = np.empty((n, 4))
        _kernels.along_normal(cov_q, shape, pdf_a, pdf_b, nq, wt, prof, h, b, model, JtWJ, JtWr, it < n_iter)
        # length prior: (pb - pa - L) / sigma_L
        JtWJ[:, 1, 1] += wprior
        JtWJ[:, 2, 2] += wprior
        JtWJ[:, 1, 2] -= wprior
        JtWJ[:, 2, 1] -= wprior
        if it == n_iter:
            break
        lres = pb - pa - L
        JtWr[:, 1] += wprior * lres
        JtWr[:, 2] -= wprior * lres
        step = _solve(JtWJ, JtWr)
        h = np.maximum(h + step[:, 0], 1e-6)
        pa = pa + np.clip(step[:, 1], -2.0, 2.0)
        pb = pb + np.clip(step[:, 2], -2.0, 2.0)
        b = b + step[:, 3]
    r = prof - model
    dof = np.maximum((wt > 0).sum(axis=1) - k, 1)
    chi2 = (r * r * wt).sum(axis=1) / dof
    # first moment of the line density along the trail (the image position
    # averaged over the exposure): insensitive to the jitter at the two ends.
    # Samples without coverage are filled with the fitted model.
    # The density is the plain (unweighted) sum across the window, so that a change of
    # seeing along the trail (which changes the PSF-weighted sum) does not move it.
    lo = pa - 3.0 * s
    hi = pb + 3.0 * s
    win = (P >= lo[:, None]) & (P <= hi[:, None])
    frac = nq  # fraction of the line-spread function on valid samples
    if sums is None:
        sums = _plain_sums(vals, valid, var)
    nval, prof_u, pvar_u = sums
    have = frac > 0.8
    dens = np.where(have, (prof_u - b[:, None] * nval) / np.where(have, frac, 1.0), h[:, None] * shape)
    dvar = np.where(have, pvar_u / np.where(have, frac, 1.0) ** 2, 0.0)
    # relative brightness slope along the plateau (per unit fraction of the trail):
    # the line density on tau = (p - pa) / (pb - pa) in [0.15, 0.85], fitted as c0 + c1 (tau - 0.5)
    tau = (P - pa[:, None]) / np.maximum(pb - pa, 1.0)[:, None]
    plat = (tau >= 0.15) & (tau <= 0.85) & have
    wv = np.where(plat, 1.0 / np.maximum(dvar, 1e-30), 0.0)
    tt = tau - 0.5
    sw, st, stt = wv.sum(axis=1), (wv * tt).sum(axis=1), (wv * tt * tt).sum(axis=1)
    sd, std_ = (wv * dens).sum(axis=1), (wv * tt * dens).sum(axis=1)
    det = sw * stt - st * st
    ok_det = det > 0
    c0 = np.where(ok_det, (stt * sd - st * std_) / np.where(ok_det, det, 1.0), np.nan)
    c1 = np.where(ok_det, (sw * std_ - st * sd) / np.where(ok_det, det, 1.0), np.nan)
    c1_err = np.where(ok_det, np.sqrt(np.abs(sw / np.where(ok_det, det, 1.0))), np.nan)
    rel_slope = c1 / np.where(c0 > 0, c0, np.nan)
    rel_slope_err = c1_err / np.where(c0 > 0, c0, np.nan)
    dens = np.where(win, dens, 0.0)
    tot = dens.sum(axis=1)
    pm_mom = (dens * P).sum(axis=1) / np.where(tot != 0, tot, np.nan)
    pm_err = np.sqrt((np.where(win, dvar, 0.0) * (P - pm_mom[:, None]) ** 2).sum(axis=1)) / np.abs(tot)
    return pa, pb, h, b, _cov(JtWJ), chi2, cov_q, pm_mom, pm_err, rel_slope, rel_slope_err


def _plain_sums(vals, valid, var):
    """Number of valid samples, data and variance summed across each trail (per ``p``)."""
    # einsum: ~4x faster than .sum(axis=2) over the short cross axis
    return np.einsum("npq->np", valid), np.einsum("npq->np", vals), np.einsum("npq->np", var)


def fit_trails(image, x_mid, y_mid, grid: TrailGrid, *, rms, gain=1.0, bad=None, model_image=None,
               own_flux=None, neighbours=None, n_iter=6, fit_sigma=False, length_prior_px=1.0, use_moment=False):
    """Fit trails seeded at ``(x_mid, y_mid)`` (pixels, trail middles).

    Parameters
    ----------
    image : ndarray (ny, nx)
        Background-subtracted image (ADU).
    x_mid, y_mid : array_like
        Seed positions of the trail middles (0-based pixels), within ~2 px.
    grid : TrailGrid
    rms : float or array_like
        Background noise (ADU per pixel) at each trail.
    gain : float
        e-/ADU, for the Poisson variance of the trail itself.
    bad : ndarray of bool, optional
        Pixels to ignore.
    model_image : ndarray, optional
        Rendered model of all trails (:func:`render_trails`); when given, the
        other trails are subtracted before fitting (joint fit by iteration).
    own_flux : dict, optional
        The parameters used to render ``model_image`` for these same trails
        (keys ``x_mid``, ``y_mid``, ``h``), so that a trail's own model is
        added back.
    neighbours : ndarray (n, np, nq), optional
        Instead of ``model_image``: the model of the other trails on each
        trail's own grid (:func:`neighbour_models`), subtracted before fitting.
    fit_sigma : bool
        Fit the cross-track width per trail (returned as ``sigma_px``).
    use_moment : bool
        Place the middle of an untruncated trail at the first moment of its
        along-track line density (the position averaged over the exposure,
        insensitive to the image jitter at the two ends) instead of halfway
        between the fitted edges. Off by default: the moment is ~2x noisier
        (its lever arm is the whole trail) and more sensitive to faint
        neighbours and cosmic rays than the edges.

    Returns
    -------
    dict of ndarray
        ``x_mid, y_mid`` (fitted middle), ``x_start, y_start, x_end, y_end``
        (fitted edges), ``p_err, q_err`` (along/cross errors of the middle),
        ``x_err, y_err``, ``flux`` (ADU of the full trail), ``flux_err``,
        ``h`` (ADU per pixel of length), ``length_px`` (fitted), ``length_err``,
        ``sigma_px``, ``start_visible, end_visible`` (bool), ``ok`` (bool),
        ``chi2_along, chi2_cross``, ``rel_slope`` (relative brightness change
        from start to end along the plateau) and its error, ``moment_used``.
    """
    x_mid = np.atleast_1d(np.asarray(x_mid, dtype=float))
    y_mid = np.atleast_1d(np.asarray(y_mid, dtype=float))
    n = x_mid.size
    rms = np.broadcast_to(np.asarray(rms, dtype=float), (n,))
    sig = grid.sigma_px
    if n == 0:
        empty = np.zeros(0)
        keys = ["x_mid", "y_mid", "x_start", "y_start", "x_end", "y_end", "p_err", "q_err", "x_err", "y_err",
                "flux", "flux_err", "h", "length_px", "length_err", "sigma_px", "chi2_along", "chi2_cross"]
        out = {k: empty for k in keys}
        out.update(start_visible=np.zeros(0, bool), end_visible=np.zeros(0, bool), ok=np.zeros(0, bool))
        return out
    xa = np.rint(x_mid)
    ya = np.rint(y_mid)
    vals, valid, inside = _sample(image, grid, xa, ya, bad)
    fused = vals.dtype == np.float64 and vals.flags.c_contiguous and model_image is None
    if neighbours is not None and not fused:
        vals = np.where(valid, vals - neighbours, 0.0)
    elif model_image is not None:
        mvals, _, _ = _sample(model_image, grid, xa, ya, None, want_inside=False)
        if own_flux.get("model") is not None:
            own = own_flux["model"]
        else:
            own = _model_on_grid(grid, xa, ya, own_flux["x_mid"], own_flux["y_mid"], own_flux["h"],
                                 own_flux.get("length_p"))
        vals = np.where(valid, vals - mvals + own, 0.0)
    dx, dy = x_mid - xa, y_mid - ya
    pm = dx * grid.ep[0] + dy * grid.ep[1]
    qm = dx * grid.eq[0] + dy * grid.eq[1]
    Lp = grid.length_p
    pa = pm - 0.5 * Lp
    pb = pm + 0.5 * Lp
    if fused:
        # the neighbours subtracted, the variance, the validity as 0/1 weights (var zero on invalid
        # samples) and the sums across the trail in one compiled pass
        var, vf = np.empty(vals.shape), np.empty(vals.shape)
        sums = (np.empty(vals.shape[:2]), np.empty(vals.shape[:2]), np.empty(vals.shape[:2]))
        nb = _NO_NEIGHBOURS if neighbours is None else np.asarray(neighbours)
        _kernels.fit_inputs(vals, valid, nb, np.ascontiguousarray(rms, dtype=float), max(float(gain), 1e-6), var, vf,
                            *sums)
        valid = vf
    else:
        var = rms[:, None, None] ** 2 + np.maximum(vals, 0.0) / max(float(gain), 1e-6)
        # the profile fits take validity as 0/1 weights, with var zero on invalid samples
        vf = valid.astype(float)
        var *= vf
        valid = vf
        sums = _plain_sums(vals, valid, var)
    s = np.full(n, sig)
    qm, s_fit, _, _, _ = _fit_cross(vals, valid, var, grid, pm, pa, pb, qm, s, fit_sigma=fit_sigma, n_iter=3)
    if fit_sigma:
        s = s_fit
    pa, pb, h, b, cov, chi2a, cov_q, _, _, _, _ = _fit_along(vals, valid, var, grid, qm, pa, pb, s,
                                                             n_iter=n_iter, length_prior_px=length_prior_px,
                                                             sums=sums)
    pm = 0.5 * (pa + pb)
    qm, s_fit, _, qvar, chi2c = _fit_cross(vals, valid, var, grid, pm, pa, pb, qm, s,
                                           fit_sigma=fit_sigma, n_iter=2)
    if fit_sigma:
        s = s_fit
    (pa, pb, h, b, cov, chi2a, cov_q, pm_mom, pm_mom_err,
     rel_slope, rel_slope_err) = _fit_along(vals, valid, var, grid, qm, pa, pb, s, n_iter=2,
                                            length_prior_px=length_prior_px, sums=sums)
    # edge visibility: the samples within 2 sigma of an edge must lie on the CCD
    P = grid.p_off[None, :]
    # samples on the CCD: all of them except on the (few) trails whose window crosses an edge
    # (an any() over the short cross axis of every trail costs more than the whole test)
    in_any = np.ones(inside.shape[:2], bool)
    cut = np.nonzero(~inside.all(axis=(1, 2)))[0]
    if cut.size:
        in_any[cut] = inside[cut].any(axis=2)
    near_a = np.abs(P - pa[:, None]) <= 2.0 * sig + 0.5
    near_b = np.abs(P - pb[:, None]) <= 2.0 * sig + 0.5
    start_visible = ~(near_a & ~in_any).any(axis=1) & near_a.any(axis=1)
    end_visible = ~(near_b & ~in_any).any(axis=1) & near_b.any(axis=1)
    # a trail cut by an edge is positioned from its visible edge and the known length
    both = start_visible & end_visible
    mom_ok = np.isfinite(pm_mom) & (np.abs(pm_mom - 0.5 * (pa + pb)) < 2.0) if use_moment else np.zeros(n, bool)
    pm = np.where(both & mom_ok, pm_mom, 0.5 * (pa + pb))
    pm = np.where(start_visible & ~end_visible, pa + 0.5 * Lp, pm)
    pm = np.where(end_visible & ~start_visible, pb - 0.5 * Lp, pm)
    var_pa, var_pb, cov_ab = cov[:, 1, 1], cov[:, 2, 2], cov[:, 1, 2]
    p_var = np.where(both, np.where(mom_ok, pm_mom_err**2, 0.25 * (var_pa + var_pb + 2 * cov_ab)),
                     np.where(start_visible, var_pa, var_pb))
    p_err = np.sqrt(np.abs(p_var))
    q_err = np.sqrt(np.abs(qvar))
    ok = (np.isfinite(pm) & np.isfinite(qm) & (np.abs(pm) < grid.p_off[-1]) & (np.abs(qm) < grid.q_off[-1] - 1)
          & (h > 0) & (start_visible | end_visible))
    # back to pixels: middle, then edges along the drift direction
    x_m = xa + pm * grid.ep[0] + qm * grid.eq[0]
    y_m = ya + pm * grid.ep[1] + qm * grid.eq[1]
    half = 0.5 * grid.length_px
    ux, uy = grid.u
    x_err = np.hypot(p_err * grid.ep[0], q_err * grid.eq[0])
    y_err = np.hypot(p_err * grid.ep[1], q_err * grid.eq[1])
    flux = h * Lp
    flux_err = np.sqrt(np.abs(cov[:, 0, 0])) * Lp
    length = (pb - pa) / grid.cos_phi
    length_err = np.sqrt(np.abs(var_pa + var_pb - 2 * cov_ab)) / grid.cos_phi
    return {
        "x_mid": x_m, "y_mid": y_m,
        "x_start": x_m - half * ux, "y_start": y_m - half * uy,
        "x_end": x_m + half * ux, "y_end": y_m + half * uy,
        "p_err": p_err, "q_err": q_err, "x_err": x_err, "y_err": y_err,
        "flux": flux, "flux_err": flux_err, "h": h, "length_px": length, "length_err": length_err,
        "sigma_px": s, "start_visible": start_visible, "end_visible": end_visible, "ok": ok,
        "chi2_along": chi2a, "chi2_cross": chi2c, "cov_q": cov_q,
        "rel_slope": rel_slope, "rel_slope_err": rel_slope_err, "moment_used": both & mom_ok,
    }


def _model_on_grid(grid: TrailGrid, xa, ya, x_mid, y_mid, h, length_p=None):
    """Analytic trail model on each trail's own grid (anchored at ``xa, ya``)."""
    Lp = grid.length_p if length_p is None else length_p
    dx = np.asarray(x_mid) - xa
    dy = np.asarray(y_mid) - ya
    pm = dx * grid.ep[0] + dy * grid.ep[1]
    qm = dx * grid.eq[0] + dy * grid.eq[1]
    P = grid.p_off[None, :, None]
    Q = grid.q_off[None, None, :]
    pa = (pm - 0.5 * Lp)[:, None, None]
    pb = (pm + 0.5 * Lp)[:, None, None]
    qc = qm[:, None, None] + (P - pm[:, None, None]) * grid.tan_phi
    ws, ss = grid.mixture
    # float32: the templates are large (stars x samples) and need no more precision
    P = P.astype(np.float32)
    Q = Q.astype(np.float32)
    pa, pb, qc = pa.astype(np.float32), pb.astype(np.float32), qc.astype(np.float32)
    # the exponents of all components in one compiled pass, one numpy exp over them (numpy's
    # vectorised float32 exp: the same values as before), then the components weighted by
    # their along-track profiles and added in one more pass
    hh = np.asarray(h, np.float32)[:, None, None]
    n, n_p, n_q = qc.shape[0], P.shape[1], Q.shape[2]
    coef = np.array([-0.5 / (sk * sk) for sk in ss], np.float32)
    along = np.empty((len(ws), n, n_p), np.float32)
    for k, (w, sk) in enumerate(zip(ws, ss)):
        inv = np.float32(1.0 / sk)
        a = (_ndtr_along((P - pa) * inv) - _ndtr_along((P - pb) * inv)) * (np.float32(w * _INV_SQRT_2PI / sk) * hh)
        along[k] = a.reshape(n, n_p)
    out = np.empty((n, n_p, n_q), np.float32)
    Qc = np.ascontiguousarray(Q.reshape(-1))
    qc = np.ascontiguousarray(qc.reshape(n, n_p))
    # by chunks of trails, so that the exponents stay in the cache between the three passes
    ex = np.empty((len(ws), min(n, _CHUNK), n_p, n_q), np.float32)
    for i0 in range(0, n, _CHUNK):
        i1 = min(i0 + _CHUNK, n)
        e = ex[:, : i1 - i0]
        _kernels.cross_args(Qc, qc[i0:i1], coef, e)
        np.exp(e, out=e)
        _kernels.mix_components(e, along[:, i0:i1], out[i0:i1])
    return out


def render_trails(shape, grid: TrailGrid, x_mid, y_mid, h, dtype=np.float32, templates=None):
    """Render the trail model of many stars into one image.

    Each trail is drawn on its own sampling grid (whole pixels when the grid
    is snapped to a pixel axis; nearest pixels otherwise) with
    ``np.add.at``, so overlapping trails add up.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(ny, nx)``.
    grid : TrailGrid
    x_mid, y_mid, h : array_like
        Trail middles (pixels) and fluxes per pixel of length (ADU).
    """
    x_mid = np.atleast_1d(np.asarray(x_mid, float))
    y_mid = np.atleast_1d(np.asarray(y_mid, float))
    if x_mid.size == 0:
        return np.zeros(shape, dtype=dtype)
    xa = np.rint(x_mid)
    ya = np.rint(y_mid)
    if templates is not None:
        model = templates * np.atleast_1d(h)[:, None, None]
    else:
        model = _model_on_grid(grid, xa, ya, x_mid, y_mid, np.atleast_1d(h))
    ny, nx = shape
    img = np.zeros(shape, dtype=dtype)
    vals = model.astype(dtype, copy=False)
    if grid.snapped:
        # whole-pixel grid: flat indices from the anchors plus one offset table; the
        # bounds are checked only for the trails whose window reaches beyond the CCD
        Pi = grid.p_off.astype(np.int64)[:, None]
        Qi = grid.q_off.astype(np.int64)[None, :]
        ox = Pi * int(grid.ep[0]) + Qi * int(grid.eq[0])
        oy = Pi * int(grid.ep[1]) + Qi * int(grid.eq[1])
        xi0 = xa.astype(np.int64)
        yi0 = ya.astype(np.int64)
        flat = (yi0 * nx + xi0)[:, None, None] + (oy * nx + ox)[None]
        edge = (xi0 + ox.min() < 0) | (xi0 + ox.max() >= nx) | (yi0 + oy.min() < 0) | (yi0 + oy.max() >= ny)
        ie = np.nonzero(edge)[0]
        if ie.size == 0:
            np.add.at(img.reshape(-1), flat.reshape(-1), vals.reshape(-1))
        else:
            xi = xi0[ie, None, None] + ox[None]
            yi = yi0[ie, None, None] + oy[None]
            ok = np.ones(flat.shape, bool)
            ok[ie] = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
            np.add.at(img.reshape(-1), flat[ok], vals[ok])
        return img
    P = grid.p_off[None, :, None]
    Q = grid.q_off[None, None, :]
    X = np.rint(xa[:, None, None] + P * grid.ep[0] + Q * grid.eq[0]).astype(np.int64)
    Y = np.rint(ya[:, None, None] + P * grid.ep[1] + Q * grid.eq[1]).astype(np.int64)
    flat = Y * nx + X
    if X.min() >= 0 and X.max() < nx and Y.min() >= 0 and Y.max() < ny:
        np.add.at(img.reshape(-1), flat.reshape(-1), vals.reshape(-1))
    else:
        ok = (X >= 0) & (X < nx) & (Y >= 0) & (Y < ny)
        np.add.at(img.reshape(-1), flat[ok], vals[ok])
    return img


def neighbour_models(grid: TrailGrid, x_mid, y_mid, src_x, src_y, src_models, *, self_index=None, scale=None,
                     model_index=None):
    """Sum of the other trails' models on each target trail's grid (whole-pixel grids only).

    What :func:`render_trails` followed by a sampling of the rendered image on
    the targets' grids gives, minus each target's own model, but computed
    pair by pair (target, overlapping source) from the sources' models on
    their own grids: on a snapped grid a source's sample ``(p, q)`` lands on
    the target's sample ``(p - dp, q - dq)``, with ``(dp, dq)`` the integer
    offset of the two anchors. No full-size image is allocated or scattered
    into (several times cheaper for the few hundred targets of a CCD).

    Parameters
    ----------
    grid : TrailGrid
        Must be ``snapped``.
    x_mid, y_mid : array_like
        Target trail middles (pixels); anchors at the nearest pixel.
    src_x, src_y : array_like
        Source trail middles.
    src_models : ndarray (m, np, nq)
        Source models on their own grids (e.g. unit templates times fluxes).
    self_index : array_like of int, optional
        Per target, the index of the source that is the target itself
        (left out), or -1.
    scale : array_like of float, optional
        Per source, a factor of its model (e.g. its flux, with unit templates
        as ``src_models``): the model is ``float32(src_models[j] * scale[j])``,
        the product taken in float64, as when the scaled models are passed.
        Only the overlapping pieces are scaled (no scaled copy of all models).
    model_index : array_like of int, optional
        Per source, the row of ``src_models`` holding its model (default: row
        ``j`` for source ``j``), so that a subset of a larger template array
        needs no copy.

    Returns
    -------
    ndarray float32 (n, np, nq)
        Summed over sources in index order.
    """
    from scipy.spatial import cKDTree

    if not grid.snapped:
        raise ValueError("neighbour_models needs a whole-pixel (snapped) grid; use render_trails")
    x_mid = np.atleast_1d(np.asarray(x_mid, float))
    y_mid = np.atleast_1d(np.asarray(y_mid, float))
    src_x = np.atleast_1d(np.asarray(src_x, float))
    src_y = np.atleast_1d(np.asarray(src_y, float))
    n_p, n_q = grid.p_off.size, grid.q_off.size
    out = np.zeros((x_mid.size, n_p, n_q), np.float32)
    if x_mid.size == 0 or src_x.size == 0:
        return out
    ep, eq = grid.ep, grid.eq

    def grid_coords(x, y):
        xa, ya = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        return xa * int(ep[0]) + ya * int(ep[1]), xa * int(eq[0]) + ya * int(eq[1])

    tp, tq = grid_coords(x_mid, y_mid)
    sp, sq = grid_coords(src_x, src_y)
    # windows overlap when the anchors differ by at most the window size on both axes
    # (scaled so that the largest overlapping offsets lie strictly inside the unit ball)
    wp, wq = n_p - 0.5, n_q - 0.5
    tt = cKDTree(np.c_[tp / wp, tq / wq])
    ts = cKDTree(np.c_[sp / wp, sq / wq])
    pairs = tt.sparse_distance_matrix(ts, 1.0, p=np.inf, output_type="ndarray")
    ti = pairs["i"].astype(np.intp)
    sj = pairs["j"].astype(np.intp)
    dp, dq = tp[ti] - sp[sj], tq[ti] - sq[sj]
    keep = (np.abs(dp) <= n_p - 1) & (np.abs(dq) <= n_q - 1)  # (exact integer test)
    if self_index is not None:
        keep &= sj != np.asarray(self_index, np.intp)[ti]
    order = np.lexsort((sj[keep], ti[keep]))  # by target, then source index
    ti, sj, dp, dq = ti[keep][order], sj[keep][order], dp[keep][order], dq[keep][order]
    if ti.size == 0:
        return out
    # target sample a (along), b (across) <- source sample a + dp, b + dq, summed over a target's
    # sources in index order: one compiled pass (no gathered (pairs, np, nq) copies), in the order of
    # np.add.reduceat (up to 129 sources per target; numpy beyond)
    rows = sj if model_index is None else np.asarray(model_index, np.intp)[sj]
    starts = np.flatnonzero(np.r_[True, ti[1:] != ti[:-1]])
    if np.diff(np.r_[starts, ti.size]).max() > 129:
        return _neighbour_sum_numpy(src_models, rows, ti, sj, dp, dq, scale, starts, out)
    if scale is None:
        src = np.ascontiguousarray(np.asarray(src_models, np.float32).reshape(-1, n_p, n_q))
        sc = np.zeros(0)
    else:
        src = np.ascontiguousarray(np.asarray(src_models).reshape(-1, n_p, n_q))
        sc = np.ascontiguousarray(np.asarray(scale, np.float64)[sj])
    _kernels.neighbour_sum(src, rows.astype(np.int64), ti.astype(np.int64), dp.astype(np.int64),
                           dq.astype(np.int64), sc, scale is not None, starts.astype(np.int64), out)
    return out


def _neighbour_sum_numpy(src_models, rows, ti, sj, dp, dq, scale, starts, out):
    """:func:`neighbour_models`' sum over the overlapping pairs by numpy gathers and ``np.add.reduceat``."""
    n_p, n_q = out.shape[1], out.shape[2]
    A = np.arange(n_p)[None, :] + dp[:, None]
    B = np.arange(n_q)[None, :] + dq[:, None]
    okA = (A >= 0) & (A < n_p)
    okB = (B >= 0) & (B < n_q)
    np.clip(A, 0, n_p - 1, out=A)
    np.clip(B, 0, n_q - 1, out=B)
    idx = (rows * (n_p * n_q))[:, None, None] + (A * n_q)[:, :, None] + B[:, None, :]
    if scale is None:
        g = np.take(np.asarray(src_models, np.float32).reshape(-1), idx)
    else:
        g = np.take(np.asarray(src_models).reshape(-1), idx).astype(np.float64)
        g *= np.asarray(scale, np.float64)[sj][:, None, None]
        g = g.astype(np.float32)
    g *= okA[:, :, None] & okB[:, None, :]
    out[ti[starts]] = np.add.reduceat(g, starts, axis=0)
    return out


def _along_overlap_table(length_p, sigma, sigma2=None, step=0.05):
    """Table of ``f(d) = integral B1(p) B2(p - d) dp`` for along-track profiles of two widths."""
    sigma2 = sigma if sigma2 is None else sigma2
    ext = length_p + 8 * max(sigma, sigma2)
    p = np.arange(-ext, ext + step / 2, step)
    B = ndtr((p + 0.5 * length_p) / sigma) - ndtr((p - 0.5 * length_p) / sigma)
    B2 = ndtr((p + 0.5 * length_p) / sigma2) - ndtr((p - 0.5 * length_p) / sigma2)
    corr = np.correlate(B, B2, mode="full") * step
    d = (np.arange(corr.size) - (B.size - 1)) * step
    return d, corr


def solve_fluxes(image, grid: TrailGrid, x_mid, y_mid, *, rms, gain=1.0, bad=None, return_templates=False):
    """Joint linear least-squares fluxes of many trails at fixed positions.

    The model is ``sum_i h_i T_i`` with ``T_i`` the unit trail template
    (line-segment ⊗ Gaussian) at trail ``i``. The normal matrix is sparse:
    its diagonal ``sum T_i^2`` is computed on the sampled (unmasked, on-CCD)
    pixels, the overlaps of neighbouring trails analytically (product of the
    along-track overlap, tabulated, and the Gaussian cross overlap). Solving
    it separates overlapping trails exactly (up to the template).

    Returns
    -------
    h, h_err : ndarray
        Flux per pixel of length (ADU) and its error (background noise with
        the blend degeneracy to first order, plus the trail's own Poisson noise).
    blend_frac : ndarray
        ``sum_j |A_ij h_j| / (A_ii |h_i|)``: how much neighbours overlap a trail.
    templates : ndarray (n, np, nq)
        With ``return_templates``: the unit templates on each trail's grid
        (zero on invalid samples), for :func:`render_trails` and ``own_model``.
    local_snr : ndarray
        With ``return_templates``: S/N of all the light on a trail's template
        (its own and its neighbours'), i.e. the significance of the blend.
    """
    from scipy import sparse
    from scipy.sparse.linalg import spsolve
    from scipy.spatial import cKDTree

    x_mid = np.asarray(x_mid, float)
    y_mid = np.asarray(y_mid, float)
    n = x_mid.size
    if n == 0:
        z = np.zeros(0)
        return z, z, z
    rms = np.broadcast_to(np.asarray(rms, float), (n,))
    xa = np.rint(x_mid)
    ya = np.rint(y_mid)
    T = _model_on_grid(grid, xa, ya, x_mid, y_mid, np.ones(n))
    # T zeroed on the invalid samples; sum T^2, sum T^3 and sum T * data per trail (float64), one pass
    Aii, S3, b = np.empty(n), np.empty(n), np.empty(n)
    if grid.snapped and image.dtype == np.float32:
        # whole-pixel grid: the pixels read in the same pass (the samples are not stored)
        Pi = grid.p_off.astype(np.int64)[:, None]
        Qi = grid.q_off.astype(np.int64)[None, :]
        valid = np.empty(T.shape, bool)
        _kernels.sampled_template_sums(
            np.ascontiguousarray(image), _NO_BAD if bad is None else np.ascontiguousarray(bad, dtype=bool),
            xa.astype(np.int64), ya.astype(np.int64),
            np.ascontiguousarray(Pi * int(grid.ep[0]) + Qi * int(grid.eq[0])),
            np.ascontiguousarray(Pi * int(grid.ep[1]) + Qi * int(grid.eq[1])),
            T.reshape(n, -1), valid.reshape(n, -1), Aii, S3, b)
    else:
        # the samples stay float32 (as in the image): the products are accumulated in float64
        vals, valid, _ = _sample(image, grid, xa, ya, bad, dtype=np.result_type(image.dtype, np.float32),
                                 want_inside=False)
        _kernels.template_sums(T.reshape(n, -1), valid.reshape(n, -1), vals.reshape(n, -1), Aii, S3, b)
        del vals
    # neighbour pairs (grid frame)
    p = x_mid * grid.ep[0] + y_mid * grid.ep[1]
    q = x_mid * grid.eq[0] + y_mid * grid.eq[1]
    sig = grid.sigma_px
    smax = float(np.max(grid.mixture[1]))
    reach_p = grid.length_p + 8 * max(sig, smax)
    reach_q = 8 * max(sig, smax)
    tree = cKDTree(np.c_[p / reach_p, q / reach_q])
    pairs = tree.query_pairs(r=1.0, p=np.inf, output_type="ndarray")
    rows = [np.arange(n)]
    cols = [np.arange(n)]
    data = [np.maximum(Aii, 1e-12)]
    offd = np.zeros(0)
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        ws, ss = grid.mixture
        dp = np.abs(p[i] - p[j])
        dq = q[i] - q[j]
        offd = np.zeros(dp.size)
        for wk, sk in zip(ws, ss):
            for wl, sl in zip(ws, ss):
                d_tab, f_tab = _along_overlap_table(grid.length_p, sk, sl)
                fa = np.interp(dp, d_tab, f_tab, right=0.0)
                s2 = sk * sk + sl * sl
                fc = np.exp(-0.5 * dq * dq / s2) / math.sqrt(2 * math.pi * s2)
                offd += wk * wl * fa * fc
        rows += [i, j]
        cols += [j, i]
        data += [offd, offd]
    # trails cut by the CCD edge or by masked pixels: overlaps on the valid samples only
    if len(pairs):
        frac = np.einsum("ij->i", valid.reshape(n, -1), dtype=np.float64) / (valid.size // max(n, 1))
        full_frac = np.median(frac)
        partial = frac < 0.98 * full_frac
        redo = np.nonzero(partial[i] | partial[j])[0]
        if redo.size:
            ii, jj = i[redo], j[redo]
            Ti = _model_on_grid(grid, xa[ii], ya[ii], x_mid[ii], y_mid[ii], np.ones(redo.size)) * valid[ii]
            Tj = _model_on_grid(grid, xa[ii], ya[ii], x_mid[jj], y_mid[jj], np.ones(redo.size))
            offd[redo] = (Ti * Tj).sum(axis=(1, 2))  # validity is per pixel: i's grid holds it
            data[1] = offd
            data[2] = offd
    A = sparse.csr_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    h = spsolve(A.tocsc(), b)
    h = np.asarray(h, float)
    # error: Schur complement with the direct neighbours, plus Poisson noise of the trail
    schur = Aii.copy()
    mix = np.zeros(n)
    if len(pairs):
        np.subtract.at(schur, i, offd**2 / np.maximum(Aii[j], 1e-12))
        np.subtract.at(schur, j, offd**2 / np.maximum(Aii[i], 1e-12))
        np.add.at(mix, i, np.abs(offd * h[j]))
        np.add.at(mix, j, np.abs(offd * h[i]))
    schur = np.maximum(schur, 0.05 * Aii)
    var = rms**2 / np.maximum(schur, 1e-12) + np.maximum(h, 0) * S3 / (max(float(gain), 1e-6) * np.maximum(Aii, 1e-12) ** 2)
    blend = mix / np.maximum(Aii * np.abs(h), 1e-12)
    local_snr = b / np.sqrt(np.maximum(Aii, 1e-12)) / np.maximum(rms, 1e-12)
    if return_templates:
        return h, np.sqrt(var), blend, T, local_snr
    return h, np.sqrt(var), blend


def measure_lsf(image, grid: TrailGrid, x_mid, y_mid, *, bad=None, n_gauss=2, half_width=None):
    """Measure the PSF line-spread function (cross-track profile) on bright trails.

    The cross-track profiles of the given (bright, isolated, unsaturated)
    trails are averaged along their plateaus, re-centred on their fitted
    centres, normalised and stacked; a mixture of ``n_gauss`` concentric
    Gaussians is fitted to the stack. The mixture carries the PSF wings a
    single Gaussian misses (a Moffat PSF has ~10 % of its flux there), so
    models of bright neighbours subtract cleanly and fluxes are not biased low.

    Returns
    -------
    (weights, sigmas) or None
        None when fewer than 5 usable trails.
    """
    from scipy.optimize import least_squares

    x_mid = np.asarray(x_mid, float)
    y_mid = np.asarray(y_mid, float)
    if x_mid.size < 5:
        return None
    hw = int(half_width) if half_width is not None else int(math.ceil(5 * grid.sigma_px)) + 2
    wide = make_grid(grid.u, grid.length_px, grid.sigma_px, half_width=hw)
    xa, ya = np.rint(x_mid), np.rint(y_mid)
    vals, valid, _ = _sample(image, wide, xa, ya, bad, want_inside=False)
    dx, dy = x_mid - xa, y_mid - ya
    pm = dx * wide.ep[0] + dy * wide.ep[1]
    qm = dx * wide.eq[0] + dy * wide.eq[1]
    P = wide.p_off[None, :, None]
    half = 0.5 * wide.length_p - 2 * grid.sigma_px
    inplat = (np.abs(P - pm[:, None, None]) < half) & valid
    n = inplat.sum(axis=1)
    prof = np.where(n > 0, (vals * inplat).sum(axis=1) / np.maximum(n, 1), np.nan)  # (n, nq)
    # local background from the outer samples, then normalise
    edge = np.abs(wide.q_off) >= hw - 1
    bkg = np.nanmedian(prof[:, edge], axis=1)
    prof = prof - bkg[:, None]
    tot = np.nansum(prof, axis=1)
    ok = (tot > 0) & np.all(np.isfinite(prof), axis=1)
    if ok.sum() < 5:
        return None
    qq = (wide.q_off[None, :] - qm[:, None])[ok].ravel()
    yy = (prof[ok] / tot[ok, None]).ravel()
    s0 = grid.sigma_px

    q2 = qq * qq

    def components(par):
        """Weights and the unit-flux Gaussians of the mixture at ``qq``."""
        ws = np.r_[par[:n_gauss - 1], 1.0 - np.sum(par[:n_gauss - 1])]
        sk = par[n_gauss - 1:]
        G = np.exp(-0.5 * q2[:, None] / (sk * sk)[None, :]) * (_INV_SQRT_2PI / sk)[None, :]
        return ws, sk, G

    def resid(par):
        ws, _, G = components(par)
        return G @ ws - yy

    def jac(par):
        # analytic Jacobian: one model evaluation instead of one per parameter (2-point differences)
        ws, sk, G = components(par)
        dw = G[:, : n_gauss - 1] - G[:, n_gauss - 1:]  # the last weight is 1 - sum of the others
        ds = ws[None, :] * G * (q2[:, None] / (sk * sk)[None, :] - 1.0) / sk[None, :]
        return np.hstack([dw, ds])

    p0 = np.r_[np.full(n_gauss - 1, 0.8 / max(n_gauss - 1, 1)), s0 * np.geomspace(0.9, 2.0, n_gauss)]
    lo = np.r_[np.zeros(n_gauss - 1), np.full(n_gauss, 0.3 * s0)]
    hi = np.r_[np.ones(n_gauss - 1), np.full(n_gauss, 6.0 * s0)]
    try:
        res = least_squares(resid, np.clip(p0, lo + 1e-6, hi - 1e-6), jac=jac, bounds=(lo, hi),
                            loss="soft_l1", f_scale=0.01)
    except ValueError:
        return None
    par = res.x
    ws = np.r_[par[:n_gauss - 1], 1.0 - np.sum(par[:n_gauss - 1])]
    if np.any(ws < -0.05) or not np.all(np.isfinite(par)):
        return None
    log.debug("line-spread function: weights %s, sigmas %s px", np.round(ws, 3), np.round(par[n_gauss - 1:], 3))
    return ws, par[n_gauss - 1:]
