"""Cross-track profile measured from the data, common to all stars at an instant.

At a given instant every star of a CCD is seen through the same atmosphere and
tracking: the cross-track profile (the along-track-integrated PSF of one
sample, i.e. the line-spread function) and its cross-track jitter are shared.
We therefore measure, from the ensemble of bright isolated reference stars,

* a common cross-track shift per sample (the jitter), ``shift[k]``;
* a cross offset of the forced position of each reference star, ``delta[s]``
  (catalogue/WCS error; for other stars it is a second-order effect on the
  flux and is not fitted);
* an empirical profile per sample (a fitted combination of pixel-integrated
  Gaussians of fixed widths, tabulated every ``bin_px``), from a
  running window of ``2*halfwindow + 1`` samples (the seeing changes on
  seconds), tabulated against ``u = offset - delta[s] - shift[k]``.

An empirical table rather than a parametric Moffat/Gaussian because the real
PSF is neither (and the simulator's is a Gaussian mixture); its normalisation
per star and sample makes the extraction insensitive to the table's scale.
Shifts come from a linearised least-squares fit of the table to each strip
(Gauss-Newton on the shift only), alternated with rebuilding the table.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from ._kernels import fwhm_rows, profile_design, table_cells

__all__ = ["CrossProfile", "measure_profile", "BASIS_SIGMAS_PX"]

_SQRT2 = math.sqrt(2.0)

log = logging.getLogger(__name__)


@dataclass
class CrossProfile:
    """Empirical cross-track profile per sample.

    Attributes
    ----------
    table : ndarray (K, NB)
        Profile per sample on the grid ``u0 + bin_px * arange(NB)``
        (arbitrary normalisation; evaluate with :meth:`strip_profile`).
    u0, bin_px : float
    shift : ndarray (K,)
        Common cross-track shift per sample (px).
    fwhm_px : ndarray (K,)
        FWHM of the table per sample (px), for reporting and ramp widths.
    n_ref : int
        Reference stars used.
    """

    table: np.ndarray
    u0: float
    bin_px: float
    shift: np.ndarray
    fwhm_px: np.ndarray
    n_ref: int
    total: np.ndarray | None = None  # (K,) integral of each row (flux normalisation)
    _padded: np.ndarray | None = None
    _pad: int = 0
    _cplx: dict | None = None

    def __post_init__(self):
        self.table = np.ascontiguousarray(self.table, dtype=np.float32)
        if self.total is None:
            self.total = (self.table.sum(axis=1) * self.bin_px).astype(np.float64)
        self.total = np.where(self.total > 0, self.total, 1.0)

    def _padded_table(self, reach_px):
        pad = int(math.ceil((reach_px + 3.0) / self.bin_px))
        if self._padded is None or self._pad < pad:
            K, nb = self.table.shape
            tp = np.zeros((K, nb + 2 * pad + 2), dtype=np.float32)
            tp[:, pad : pad + nb] = self.table
            self._padded, self._pad = tp, pad
        return self._padded, self._pad

    def _complex_table(self, pad, scaled):
        """Padded table as complex64 ``value + 1j * (next value - value)`` (one gather
        per cell gives both interpolation nodes), rows scaled by ``1 / total`` if ``scaled``."""
        key = (pad, bool(scaled))
        if self._cplx is None:
            self._cplx = {}
        if key not in self._cplx:
            tp = np.maximum(self._padded, np.float32(0))  # non-negative: so is every interpolate
            if scaled:
                tp = (tp / self.total[:, None]).astype(np.float32)
            tc = np.zeros(tp.shape, dtype=np.complex64)
            tc.real = tp
            tc.imag[:, :-1] = tp[:, 1:] - tp[:, :-1]
            self._cplx[key] = tc
        return self._cplx[key]

    def strip_profile(self, psi, k_rows, half_width, *, normalise="total", derivative=False, reach_px=None):
        """Profile on the cells ``c = -W..W`` of strips whose star sits at ``-psi``.

        The profile of cell ``c`` is the table at ``u = c + psi``, where
        ``psi = phase - shift[k] - delta - extra`` (``phase`` = the cell grid's
        offset from the nominal position). The cell grid is a whole number of
        table steps, so only ``psi`` needs interpolating: one floor per strip,
        and the ``2W + 1`` cells of a strip are one strided read of a complex
        table holding each node and its difference to the next.

        Parameters
        ----------
        psi : ndarray (S, K)
        k_rows : ndarray of int, broadcastable to (S, K)
            Table row (sample) of each strip.
        half_width : int
        normalise : {'total', 'window', None}
            ``'total'``: unit integral over all ``u`` (the fitted flux is the
            total flux, i.e. aperture-corrected); ``'window'``: unit sum over
            the strip; None: raw table values.
        derivative : bool
            Also return dP/du (same normalisation).
        reach_px : float, optional
            Largest ``|psi|`` to support (default ``3 * half_width``); beyond
            it the profile is zero.

        Returns
        -------
        P (S, K, C) float32 [, dP]
        """
        W = int(half_width)
        C = 2 * W + 1
        h = self.bin_px
        step = int(round(1.0 / h))
        reach = 3.0 * W if reach_px is None else float(reach_px)
        _, pad = self._padded_table(reach + W)
        tc = self._complex_table(pad, normalise == "total")
        K, nbp = tc.shape
        psi = np.asarray(psi, dtype=np.float64)
        k_rows = np.broadcast_to(np.asarray(k_rows, dtype=np.int64), psi.shape)
        if normalise != "window" and not derivative:
            # one compiled loop over the strips (pydriftn.extract._kernels.table_cells): the same
            # interpolation, without the gathered (strips, cells) complex temporary
            n_start = nbp - step * (C - 1) - 1
            p = table_cells(tc, np.ascontiguousarray(psi).reshape(-1), np.ascontiguousarray(k_rows).reshape(-1),
                            float(self.u0), float(h), int(pad), int(step), W, float(reach), int(n_start))
            return p.reshape(psi.shape + (C,))
        far = ~(np.abs(psi) <= reach)
        g = (np.where(far, 0.0, psi) - self.u0) / h + pad
        i0 = np.floor(g)
        fr = (g - i0).astype(np.float32)[..., None]
        # view: cells[k, i, c] = table[k, i + step * c]; strip (s, k) reads row i0 - step*W
        n_start = nbp - step * (C - 1) - 1
        cells = np.lib.stride_tricks.as_strided(tc, shape=(K, n_start, C),
                                                strides=(tc.strides[0], tc.strides[1], tc.strides[1] * step),
                                                writeable=False)
        start = np.clip(i0.astype(np.int64) - step * W, 0, n_start - 1)
        v = cells[k_rows, start]
        p = v.imag * fr
        p += v.real
        if normalise == "window":
            ssum = p.sum(axis=-1, keepdims=True)
            nrm = np.where(ssum > 0, 1.0 / np.where(ssum > 0, ssum, 1.0), 0.0).astype(np.float32)
            p *= nrm
        else:
            nrm = None
        if far.any():
            p[far] = 0.0
        if derivative:
            dp = v.imag * np.float32(1.0 / h)
            if nrm is not None:
                dp *= nrm
            if far.any():
                dp[far] = 0.0
            return p, dp
        return p


def _running_sum(a, halfwindow):
    """Sum over a running window of ``2*halfwindow+1`` rows (axis 0), truncated at the ends."""
    if halfwindow <= 0:
        return a
    c = np.concatenate([np.zeros((1,) + a.shape[1:], dtype=a.dtype), np.cumsum(a, axis=0)], axis=0)
    n = a.shape[0]
    i = np.arange(n)
    lo = np.clip(i - halfwindow, 0, n)
    hi = np.clip(i + halfwindow + 1, 0, n)
    return c[hi] - c[lo]


def _fwhm_of_table(table, u):
    """FWHM of each row (half-maximum crossings, linearly interpolated)."""
    if table.dtype == np.float32 and table.ndim == 2:
        return fwhm_rows(np.ascontiguousarray(table), np.asarray(u, dtype=np.float64))  # the loop below, compiled
    out = np.empty(table.shape[0])
    for r, t in enumerate(table):
        i = int(np.argmax(t))
        half = 0.5 * t[i]
        if half <= 0:
            out[r] = np.nan
            continue
        left = np.flatnonzero(t[:i] < half)
        right = np.flatnonzero(t[i:] < half)
        if len(left) == 0 or len(right) == 0:
            out[r] = np.nan
            continue
        a = left[-1]
        xl = u[a] + (half - t[a]) / (t[a + 1] - t[a]) * (u[a + 1] - u[a])
        b = i + right[0]
        xr = u[b - 1] + (t[b - 1] - half) / (t[b - 1] - t[b]) * (u[b] - u[b - 1])
        out[r] = xr - xl
    return out


#: Widths (px) of the pixel-integrated Gaussian basis of the profile model.
BASIS_SIGMAS_PX = (0.45, 0.7, 1.05, 1.55, 2.3, 3.4, 5.0)


def _basis_grid(ugrid, sigmas=BASIS_SIGMAS_PX):
    """Pixel-integrated unit Gaussians (columns) tabulated on ``ugrid``."""
    s = np.asarray(sigmas, dtype=float)[None, :] * _SQRT2
    return (0.5 * (erf((ugrid[:, None] + 0.5) / s) - erf((ugrid[:, None] - 0.5) / s))).astype(np.float64)


def measure_profile(strips, ref, *, halfwindow=2, bin_px=0.05, n_iter=2, prior_offset_px=0.15,
                    sigmas=BASIS_SIGMAS_PX):
    """Measure the common cross-track profile, shifts and per-star offsets.

    The profile of each sample is a linear combination of pixel-integrated
    Gaussians of fixed widths (``sigmas``), fitted by weighted least squares to
    the normalised strips of the reference stars in a running window of
    ``2*halfwindow+1`` samples; it is smooth, exactly pixel-integrated and
    needs few parameters, so a few tens of reference stars suffice. It is then
    tabulated on a fine grid (``bin_px``) for fast evaluation.

    Parameters
    ----------
    strips : pydriftn.extract.stamps.Strips
    ref : ndarray of bool (S,)
        Reference stars (bright, unsaturated, isolated).
    halfwindow : int
        Running window half-width in samples for the profile shape.
    bin_px : float
        Tabulation step (px).
    n_iter : int
        Alternations of (profile, shifts).
    prior_offset_px : float
        Unused here (see :func:`star_offsets`); kept for a stable signature.
    sigmas : sequence of float
        Basis widths (px).

    Returns
    -------
    profile : CrossProfile
    delta : ndarray (S,)
        Per-star cross offsets (px) of the reference stars (0 for the others).
    delta_err : ndarray (S,)
    """
    S, K, C = strips.data.shape
    W = strips.half_width
    ridx = np.flatnonzero(ref)
    u0 = -W - 2.0
    nb = int(round((2 * W + 4) / bin_px)) + 1
    ugrid = u0 + bin_px * np.arange(nb)
    bgrid = _basis_grid(ugrid, sigmas)
    nbas = bgrid.shape[1]
    b_val = np.ascontiguousarray(bgrid)
    b_diff = np.zeros(bgrid.shape)  # difference to the next node
    b_diff[:-1] = bgrid[1:] - bgrid[:-1]
    shift = np.zeros(K, dtype=np.float32)
    delta = np.zeros(S, dtype=np.float32)
    delta_err = np.full(S, np.inf, dtype=np.float32)
    if len(ridx) == 0:
        sig = 4.0 / 2.3548
        table = np.broadcast_to(_basis_grid(ugrid, (sig,))[:, 0], (K, nb)).astype(np.float32).copy()
        log.warning("measure_profile: no reference stars; using a nominal Gaussian profile (FWHM 4 px)")
        return CrossProfile(table, u0, bin_px, shift, np.full(K, 4.0), 0), delta, delta_err

    d = strips.data[ridx].astype(np.float64)
    v0 = strips.var0[ridx]
    good = ~strips.bad[ridx]
    off = strips.offset_rows(ridx)
    strip_ok = good.all(axis=2)
    B = d.sum(axis=2)
    strip_ok &= B > 0
    Bsafe = np.where(strip_ok, B, 1.0)
    y = d / Bsafe[:, :, None]
    var_y = (v0 + np.maximum(d, 0)) / (Bsafe[:, :, None] ** 2)
    wy = np.where(strip_ok[:, :, None], 1.0 / np.maximum(var_y, 1e-12), 0.0)
    prof = None
    n_iter = max(int(n_iter), 2)
    for it in range(n_iter):
        # the basis interpolated at u = offset - shift - delta of every cell (R, K, C, nbas), and in
        # sample-major order (K, R * C, nbas) without and with the cell weights: one compiled loop
        X, Xk, Xkw = profile_design(off, shift, delta[ridx], float(u0), float(bin_px), int(nb), b_val, b_diff,
                                    np.ascontiguousarray(wy, dtype=np.float64))
        # normal equations per sample, as batched matrix products over (ref, cell)
        XkT_w = np.swapaxes(Xkw, 1, 2)
        Nk = XkT_w @ Xk
        bk = (XkT_w @ y.transpose(1, 0, 2).reshape(K, -1, 1))[..., 0]
        Nk = _running_sum(Nk, halfwindow)
        bk = _running_sum(bk, halfwindow)
        ridge = 1e-8 * np.trace(Nk, axis1=1, axis2=2)[:, None, None] * np.eye(nbas)[None]
        try:
            coef = np.linalg.solve(Nk + ridge, bk[..., None])[..., 0]
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(Nk.sum(axis=0), bk.sum(axis=0), rcond=None)[0][None, :].repeat(K, 0)
        # robustness: reference strips with a cell far from the fitted model
        # (unmasked cosmic ray, undetected neighbour; it also biases the strip's
        # normalisation) get zero weight in the next pass
        model = np.einsum("rkci,ki->rkc", X, coef)
        z2 = (y - model) ** 2 / (var_y + (0.05 * np.abs(model)) ** 2)
        wy = np.where((z2 > 25.0).any(axis=2, keepdims=True), 0.0, wy)
        table = (coef @ bgrid.T).astype(np.float32)
        table = np.maximum(table, 0.0)
        prof = CrossProfile(table, u0, bin_px, shift.copy(), _fwhm_of_table(table, ugrid), len(ridx),
                            total=coef.sum(axis=1))
        if it == n_iter - 1:
            break
        # Gauss-Newton step on the shift of every reference strip
        psi = strips.phase[ridx] - shift[None, :] - delta[ridx][:, None]
        P, dP = prof.strip_profile(psi, np.arange(K)[None, :], W, normalise="window", derivative=True)
        F = B[:, :, None]
        V = v0 + np.maximum(F * P, 0)
        r = d - F * P
        w = np.where(good, 1.0 / V, 0.0)
        num = (w * r * (-F * dP)).sum(axis=2)
        den = (w * (F * dP) ** 2).sum(axis=2)
        use = strip_ok & (wy > 0).any(axis=2)  # strips rejected as outliers do not vote
        num = np.where(use, num, 0.0)
        den = np.where(use, den, 0.0)
        # r ~ -ds * F dP  =>  num = ds * den
        ds = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
        cw = den.sum(axis=0)
        common = np.where(cw > 0, (den * ds).sum(axis=0) / np.where(cw > 0, cw, 1.0), 0.0)
        sw_s = den.sum(axis=1)
        star = np.where(sw_s > 0, (den * (ds - common[None, :])).sum(axis=1) / np.where(sw_s > 0, sw_s, 1.0), 0.0)
        if sw_s.sum() > 0:
            star -= np.average(star, weights=np.maximum(sw_s, 1e-30))
        shift = (shift + common).astype(np.float32)
        delta[ridx] = (delta[ridx] + star).astype(np.float32)
        delta_err[ridx] = np.where(sw_s > 0, 1.0 / np.sqrt(np.where(sw_s > 0, sw_s, 1.0)), np.inf)
        shift -= np.float32(np.median(shift))  # the profile carries the mean position
    log.debug("measure_profile: %d refs, median FWHM %.2f px, shift rms %.3f px",
              len(ridx), float(np.nanmedian(prof.fwhm_px)), float(np.std(prof.shift)))
    return prof, delta, delta_err
