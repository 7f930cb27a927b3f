"""Least-squares fits of candidate light curves: finite-source point lens, FRED flare, flat.

PSF smearing. A sample ``k`` of a star is the light in one pixel strip of its
trail, and the star drifts one pixel per sample while its PSF spreads its
light over ~FWHM pixels along the drift, so the sample is the true light curve
``F`` convolved with the PSF's line-spread function (LSF) along the drift and
integrated over the strip::

    y_k = int F(t) K((t_k - t) / dt) dt / dt,    K(v) = int_{v-1/2}^{v+1/2} LSF(x) dx,

with ``t_k`` the sample's mid-time, ``dt`` the sample duration (one pixel) and
``LSF`` a Moffat (beta = 3, :data:`LSF_BETA`) PSF of the exposure's seeing FWHM
(pixels = samples) integrated across the drift, ``(1 + x^2/alpha^2)^(-5/2)``,
normalised to unit area (:func:`moffat_lsf_pixel`, exact: closed-form
antiderivative). For ``FWHM -> 0`` ``K`` is the one-pixel box, i.e. the plain
average over the sample's exposure. :class:`Smear` precomputes the
convolution for a set of sample times: ``F`` is evaluated on a supersampled
time grid (``supersample`` odd sub-steps per sample, aligned on the sample
centres, up to :data:`LSF_HALF_WIDTH_FWHM` FWHM from every sample) and the
model of every sample is a fixed weighted sum of grid values (a gather). Light
only reaches the trail while the shutter is open: given each sample's exposure
window, grid points outside it are dropped and the weights renormalised (the
extraction and the per-exposure normalisation divide the trail-end samples by
the light they can receive), so an event before shutter opening does not leak
into the first samples.

Models (times in seconds from a reference epoch, fluxes normalised to ~1;
each smeared as above when given a seeing FWHM, else averaged over the
sample's exposure):

* ``microlensing``: ``base * (fs * A(t; t0, tE, u0, rho) + 1 - fs)`` with
  ``A`` from :func:`pydriftn.models.microlensing_magnification_curve`
  (finite-source point lens, point-source limit for small ``rho``); fitted in
  ``t0, log10 tE, u0, log10 rho, base`` (and ``fs`` if ``fit_blend``).
* ``flare``: ``base * (1 + fred_flare(t; t0, amplitude, rise, decay))``,
  fitted in ``t0, amplitude, log10 rise, log10 decay, base``.
* ``flat``: ``base`` (weighted mean).
* ``flash``: ``base + amplitude * L(t - t0)``: an instantaneous flash on (or
  next to) the trail. The flash is static on the sky while the trail drifts by
  one pixel per sample, so in the series it has the shape of the PSF's
  line-spread function along the drift, integrated over each sample's
  one-pixel strip: ``K`` above (:func:`flash_profile`, the same
  :func:`moffat_lsf_pixel`) for the flash's FWHM in pixels (= samples). Fitted on a grid of
  ``t0`` and FWHM (within ``fwhm_range`` of the measured one), ``base`` and
  ``amplitude >= 0`` linear at each grid point; no optimiser. A microlensing
  event shorter than the seeing crossing time (~2 s) looks the same; a longer
  one is broader than the PSF, which is what the flash veto tests.

Fits use :func:`scipy.optimize.least_squares` (trust-region reflective with
bounds) from a few starting points derived from the matched-filter window;
parameter uncertainties come from the Jacobian at the optimum,
``cov = (J^T J)^{-1} * max(1, chi2/dof)``, propagated from log parameters.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import csr_matrix

from ..models import fred_flare, microlensing_magnification_curve, point_source_magnification

__all__ = ["FitResult", "fit_flat", "fit_microlensing", "fit_flare", "fit_flash", "microlensing_model", "flare_model",
           "flash_profile", "moffat_lsf_pixel", "Smear", "DEFAULT_PSF_FWHM_PX", "LSF_BETA"]

log = logging.getLogger(__name__)

LOG_TE_BOUNDS = (-2.0, 4.5)   # 0.01 s .. 9 h
LOG_RHO_BOUNDS = (-4.0, 2.0)  # 1e-4 (point source) .. 100
#: A finite source (rho > 0) is reported only when it improves chi2 over the point-source fit (rho = 0) by more
#: than this: Akaike's criterion (2 per extra parameter; a point-source event passes it with probability
#: 0.5 P(chi2_1 > 2) = 8 %, rho being on its boundary). Below it the data cannot tell the two, and the
#: finite-source fit wanders along the rho-u0-tE degeneracy (a large source blunting the peak of a larger-u0,
#: shorter event): on the image-level injections of tE = 1 and 3 s, u0 = 0.5, rho = 0.01 events every
#: finite-source fit gained 0-2.1 in chi2 with rho = 0.4-1.5 and tE biased low by up to 37 %; the point-source
#: fits had tE within 18 % for all but two of 71. A stricter 9 (3 sigma) lost two rho = 1 events whose flat
#: top fills their exposure (gains 2.8 and 8.1: point-source tE 2.4-2.7x too long).
FINITE_SOURCE_MIN_DCHI2 = 2.0
U0_MAX = 100.0
#: Bounds of the baseline (normalised flux). On the night scale (``level_e_s``, see :mod:`.series`) the
#: series has median 1 over the night, so a star magnified for most of the night has its baseline well below 1.
BASE_BOUNDS = (0.05, 5.0)
LSF_BETA = 3.0  # Moffat index of the PSF (the simulator's and a typical DECam PSF); the closed forms need 3
FLASH_BETA = LSF_BETA  # the flash profile is the same line-spread function
#: Seeing FWHM (pixels = samples along the trail) assumed where the store gives none (no ``lsf_fwhm_px``
#: column, NaN, synthetic series): 1.0" at DECam's 0.27"/px, the simulator's drift-exposure seeing.
DEFAULT_PSF_FWHM_PX = 3.7
#: The smearing kernel extends this many FWHM from each sample (the Moffat beta = 3 wings beyond hold
#: ~3e-4 of the light; the kernel is renormalised to unit sum).
LSF_HALF_WIDTH_FWHM = 6.0
#: Default sub-steps per sample of the smeared model grid (odd: aligned on the sample centres).
SMEAR_SUPERSAMPLE = 5


@dataclass
class FitResult:
    """Best fit of one model to one light curve.

    Attributes
    ----------
    model : str
    params, errors : dict
        Best-fit parameters and 1-sigma uncertainties (NaN if undetermined).
    chi2, chi2_flat : float
        Chi-square of the model and of the flat model on the same samples.
    n : int
        Number of samples fitted.
    success : bool
    """

    model: str
    params: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    chi2: float = np.nan
    chi2_flat: float = np.nan
    n: int = 0
    success: bool = False

    @property
    def delta_chi2(self) -> float:
        return float(self.chi2_flat - self.chi2)


def _moffat3_primitive(u):
    """``int_0^u (1 + v^2)^(-5/2) dv`` (Moffat beta = 3 integrated across the drift); -> +-2/3 at +-inf."""
    u = np.asarray(u, float)
    return u * (2.0 * u * u + 3.0) / (3.0 * (1.0 + u * u) ** 1.5)


def _moffat_alpha(fwhm_px):
    return np.asarray(fwhm_px, float) / (2.0 * np.sqrt(2.0 ** (1.0 / LSF_BETA) - 1.0))


def moffat_lsf_pixel(x, fwhm_px):
    """Fraction of a Moffat (beta = 3) star's light in a one-pixel strip at along-drift offset ``x`` (px).

    ``int_{x-1/2}^{x+1/2} LSF(v) dv`` for the line-spread function
    ``LSF(v) ~ (1 + v^2/alpha^2)^(-5/2)`` of unit area (the circular Moffat
    integrated across the drift), exactly, from the closed-form antiderivative.
    Sums to 1 over integer-spaced ``x``; ``fwhm_px -> 0`` gives the one-pixel
    box (1 for ``|x| < 1/2``). ``x`` and ``fwhm_px`` broadcast.
    """
    a = np.maximum(_moffat_alpha(fwhm_px), 1e-9)
    x = np.asarray(x, float)
    return 0.75 * (_moffat3_primitive((x + 0.5) / a) - _moffat3_primitive((x - 0.5) / a))


class Smear:
    """Precomputed PSF smearing of a light curve for a fixed set of samples (module docstring).

    Parameters
    ----------
    t_s : ndarray (n,)
        Mid-times of the samples (s).
    sample_s : float
        Sample duration (s) = one pixel of drift.
    fwhm_px : float or ndarray (n,)
        Seeing FWHM of each sample's exposure, in pixels (= samples). 0 (or
        not finite): no PSF, the model is averaged over the sample's exposure.
    supersample : int
        Model grid steps per sample (made odd).
    window : (ndarray (n,), ndarray (n,)), optional
        Shutter open and close time (s, same origin as ``t_s``) of each
        sample's exposure: no light from outside. Without it the grid extends
        freely around every run of samples.
    near : ndarray (n,) bool, optional
        Only these samples are smeared; the others take the model at their
        mid-time (for samples where the model is smooth on the scale of the
        PSF, e.g. far from a candidate: the smearing changes nothing there and
        skipping it saves most of the model grid). Default: all smeared.

    Call with a function ``f(t)`` (vectorised) to get the smeared samples;
    :attr:`t_grid` are the times ``f`` is evaluated at.
    """

    def __init__(self, t_s, sample_s, fwhm_px=0.0, supersample=SMEAR_SUPERSAMPLE, window=None, near=None):
        t = np.asarray(t_s, float)
        n = t.size
        near = np.ones(n, bool) if near is None else np.broadcast_to(np.asarray(near, bool), (n,))
        ss = max(int(supersample), 1)
        ss += 1 - ss % 2
        h = sample_s / ss
        fw = np.broadcast_to(np.asarray(fwhm_px, float), (n,))
        fw = np.where(np.isfinite(fw) & (fw > 0), fw, 0.0)
        half_px = 0.5 + LSF_HALF_WIDTH_FWHM * (fw.max() if n else 0.0)
        m = int(np.ceil(half_px * ss))
        j = np.arange(-m, m + 1)
        if window is not None:
            lo = np.broadcast_to(np.asarray(window[0], float), (n,))
            hi = np.broadcast_to(np.asarray(window[1], float), (n,))
            key = np.round(lo / h).astype(np.int64) if n else np.zeros(0, np.int64)
            seg = np.unique(key, return_inverse=True)[1].reshape(-1) if n else key
        else:
            order = np.argsort(t)
            brk = np.r_[0, np.cumsum(np.diff(t[order]) > 2.5 * sample_s)] if n else np.zeros(0, np.int64)
            seg = np.empty(n, np.int64)
            seg[order] = brk
        grids, idx, w = [], np.zeros((n, j.size), np.int64), np.zeros((n, j.size))
        start = 0
        for g in range(int(seg.max()) + 1 if n else 0):
            sel = np.flatnonzero((seg == g) & near)
            if sel.size == 0:
                continue
            tg = t[sel]
            t_ref = tg.min()
            c = np.round((tg - t_ref) / h).astype(np.int64)  # nearest grid index of each sample
            if window is not None:
                w_lo, w_hi = lo[sel].min(), hi[sel].max()
                i_lo = int(np.ceil((w_lo - t_ref) / h + 0.5 - 1e-6))
                i_hi = int(np.floor((w_hi - t_ref) / h - 0.5 + 1e-6))
            else:
                i_lo, i_hi = int(c.min()) - m, int(c.max()) + m
            i_lo, i_hi = max(i_lo, int(c.min()) - m), min(i_hi, int(c.max()) + m)
            grid = t_ref + np.arange(i_lo, i_hi + 1) * h
            ii = c[:, None] + j[None, :]
            inside = (ii >= i_lo) & (ii <= i_hi)
            off = (tg[:, None] - (t_ref + ii * h)) / sample_s  # (t_k - tau) in pixels
            wk = np.where(inside, moffat_lsf_pixel(off, fw[sel, None]), 0.0)
            idx[sel] = np.clip(ii - i_lo, 0, max(len(grid) - 1, 0)) + start
            w[sel] = wk
            grids.append(grid)
            start += len(grid)
        far = np.flatnonzero(~near)
        if far.size:  # the model at the sample's mid-time
            idx[far] = 0
            idx[far, m] = start + np.arange(far.size)
            w[far] = 0.0
            w[far, m] = 1.0
            grids.append(t[far])
        w[w < 1e-13] = 0.0  # rounding of the antiderivative difference far outside the box
        tot = w.sum(axis=1, keepdims=True)
        np.divide(w, tot, out=w, where=tot > 0)
        # drop the all-zero outer taps (e.g. no PSF: only the box of ss taps is non-zero)
        used = np.flatnonzero(np.any(w != 0, axis=0))
        if used.size:
            sl = slice(used[0], used[-1] + 1)
            idx, w = idx[:, sl], w[:, sl]
        self.t_grid = np.concatenate(grids) if grids else np.zeros(0)
        nz = w != 0
        rows = np.broadcast_to(np.arange(n)[:, None], w.shape)
        self.matrix = csr_matrix((w[nz], (rows[nz], idx[nz])), shape=(n, self.t_grid.size))

    def apply(self, values):
        """Smeared samples from model values on :attr:`t_grid`."""
        return self.matrix @ np.asarray(values, float)

    def __call__(self, f, *params):
        return self.apply(f(self.t_grid, *params))


def _sub_offsets(sample_s, supersample):
    n = max(int(supersample), 1)
    return ((np.arange(n) + 0.5) / n - 0.5) * sample_s


def _sample_average(curve, t_s, sample_s, supersample, *params):
    """``curve(t, *params)`` averaged over each sample's exposure (``supersample`` sub-steps)."""
    t = np.asarray(t_s, float)
    if supersample > 1 and sample_s > 0:
        tt = t[:, None] + _sub_offsets(sample_s, supersample)[None, :]
        return curve(tt, *params).mean(axis=1)
    return curve(t, *params)


def _smeared(curve, t_s, sample_s, supersample, fwhm_px, smear, *params):
    if smear is None and fwhm_px is not None and sample_s > 0:
        smear = Smear(t_s, sample_s, fwhm_px, supersample)
    if smear is not None:
        return smear(curve, *params)
    return _sample_average(curve, t_s, sample_s, supersample, *params)


def microlensing_model(t_s, t0, te, u0, rho, fs=1.0, base=1.0, sample_s=0.0, supersample=1, fwhm_px=None,
                       smear=None):
    """Normalised flux of a point-lens event as sampled along the trail.

    Without ``fwhm_px``/``smear``: averaged over each sample's exposure
    (``supersample`` sub-steps). With ``fwhm_px`` (seeing FWHM, px = samples;
    scalar or per sample) or a precomputed :class:`Smear` (which fixes the
    times, and ``t_s`` is then ignored): convolved with the PSF's line-spread
    function along the drift (module docstring).
    """
    a = _smeared(microlensing_magnification_curve, t_s, sample_s, supersample, fwhm_px, smear, t0, te, u0, rho)
    return base * (fs * a + 1.0 - fs)


def flare_model(t_s, t0, amplitude, rise_s, decay_s, base=1.0, sample_s=0.0, supersample=1, fwhm_px=None,
                smear=None):
    """Normalised flux of a FRED flare as sampled along the trail (see :func:`microlensing_model`)."""
    f = _smeared(fred_flare, t_s, sample_s, supersample, fwhm_px, smear, t0, amplitude, rise_s, decay_s)
    return base * (1.0 + f)


def fit_flat(y, err):
    """Weighted mean and its chi-square."""
    w = 1.0 / err**2
    m = float(np.sum(w * y) / np.sum(w))
    return m, float(np.sum(w * (y - m) ** 2))


def _covariance(res, n_par, chi2, dof):
    j = res.jac
    try:
        cov = np.linalg.pinv(j.T @ j)
    except np.linalg.LinAlgError:
        return np.full((n_par, n_par), np.nan)
    scale = max(1.0, chi2 / max(dof, 1))
    return cov * scale


def _best_of(fun, starts, lo, hi, max_nfev, n_keep=3):
    """Least squares from the ``n_keep`` starting points with the lowest initial cost; best result."""
    starts = [np.clip(np.asarray(p0, float), lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo)) for p0 in starts]
    if len(starts) > n_keep:
        with np.errstate(all="ignore"):
            cost0 = [float(np.sum(fun(p0) ** 2)) for p0 in starts]
        starts = [starts[k] for k in np.argsort(np.nan_to_num(cost0, nan=np.inf))[:n_keep]]
    best = None
    for p0 in starts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                r = least_squares(fun, p0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=max_nfev)
            except (ValueError, np.linalg.LinAlgError) as exc:  # pragma: no cover - defensive
                log.debug("fit start %s failed: %s", p0, exc)
                continue
        if best is None or r.cost < best.cost:
            best = r
    return best


#: The fits smear the samples within ``FIT_SMEAR_SPAN_S + 2 x window duration`` of the candidate window's
#: centre; further samples take the model at their mid-time (:class:`Smear` ``near``).
FIT_SMEAR_SPAN_S = 15.0


def _fit_smear(t_s, sample_s, fwhm_px, supersample, window, t_guess, dur):
    if fwhm_px is None:
        return None
    near = np.abs(np.asarray(t_s, float) - t_guess) <= FIT_SMEAR_SPAN_S + 2.0 * dur
    return Smear(t_s, sample_s, fwhm_px, supersample, window, near=near)


def _u_for_excess(excess):
    """Point-source u with A(u) - 1 = excess (> 0)."""
    a = 1.0 + np.maximum(excess, 1e-6)
    return float(np.sqrt(max(2.0 * a / np.sqrt(a * a - 1.0) - 2.0, 1e-8)))


def fit_microlensing(t_s, y, err, *, t_guess, duration_guess, excess_guess, sample_s=0.54, supersample=3,
                     fit_blend=False, max_nfev=200, fwhm_px=None, window=None) -> FitResult:
    """Fit the finite-source point-lens model.

    Parameters
    ----------
    t_s, y, err : ndarray
        Sample times (s), normalised fluxes and errors.
    t_guess : float
        Centre of the matched-filter window (s).
    duration_guess : float
        Duration of the window (s).
    excess_guess : float
        Mean fractional excess in the window.
    sample_s : float
        Exposure time of a sample (for the supersampled model).
    supersample : int
        Sub-steps per sample (of the exposure average, or of the smeared model grid).
    fwhm_px : float or ndarray, optional
        Seeing FWHM (px = samples; scalar or per sample): fit the PSF-smeared
        model (module docstring) to the samples within :data:`FIT_SMEAR_SPAN_S`
        + 2 ``duration_guess`` of ``t_guess`` (the model at the mid-time of
        the others). None: the model averaged over each sample.
    window : (ndarray, ndarray), optional
        Shutter open/close time of each sample's exposure (s, origin of ``t_s``), see :class:`Smear`.
    fit_blend : bool
        Also fit the source flux fraction ``fs`` (else ``fs = 1``; the
        blending/u0/tE degeneracy makes ``fs`` poorly constrained for short,
        low-amplitude events).

    Returns
    -------
    FitResult
        ``params``: ``t0_s, te_s, u0, rho, fs, base``.
    """
    base0, chi2_flat = fit_flat(y, err)
    dur = max(float(duration_guess), sample_s)
    exc = max(float(excess_guess), 1e-4)
    peak = 1.5 * exc  # peak excess is above the window mean

    def unpack(p):
        t0, lte, u0, lrho, base = p[:5]
        fs = p[5] if fit_blend else 1.0
        return t0, 10**lte, u0, 10**lrho, base, fs

    smear = _fit_smear(t_s, sample_s, fwhm_px, supersample, window, t_guess, dur)

    def resid(p):
        t0, te, u0, rho, base, fs = unpack(p)
        return (microlensing_model(t_s, t0, te, u0, rho, fs, base, sample_s, supersample, smear=smear) - y) / err

    tmin, tmax = float(np.min(t_s)), float(np.max(t_s))
    lo = [tmin - dur, LOG_TE_BOUNDS[0], 0.0, LOG_RHO_BOUNDS[0], BASE_BOUNDS[0]]
    hi = [tmax + dur, LOG_TE_BOUNDS[1], U0_MAX, LOG_RHO_BOUNDS[1], BASE_BOUNDS[1]]
    if fit_blend:
        lo.append(0.01)
        hi.append(1.0)
    lo, hi = np.array(lo), np.array(hi)

    starts = []
    # point-like source: u0 from the peak excess, tE from the half-excess width
    u0 = _u_for_excess(peak)
    uh = _u_for_excess(peak / 2.0)
    te = dur / (2.0 * np.sqrt(max(uh * uh - u0 * u0, 1e-6)))
    for rho in (1e-3, 0.3):
        starts.append([t_guess, np.log10(te), u0, np.log10(rho), base0])
    # large source: plateau 1 + 2/rho^2 over ~2 rho tE
    rho_big = float(np.sqrt(2.0 / max(peak, 1e-4)))
    if rho_big > 1.0:
        starts.append([t_guess, np.log10(dur / (2.0 * rho_big * 0.9)), 0.3 * rho_big, np.log10(rho_big), base0])
    starts.append([t_guess, np.log10(dur / 2.0), 0.3, 0.0, base0])
    if fit_blend:
        starts = [s + [1.0] for s in starts]
    r = _best_of(resid, starts, lo, hi, max_nfev)
    out = FitResult("microlensing", chi2_flat=chi2_flat, n=len(y))
    if r is None:
        return out
    chi2 = float(2.0 * r.cost)

    # the point-source model (rho = 0): kept unless the finite source improves chi2 by FINITE_SOURCE_MIN_DCHI2
    def resid_ps(q):
        return resid(np.concatenate([q[:3], [-np.inf], q[3:]]))

    keep = np.r_[0:3, 4:len(lo)]
    ps_starts = [np.clip(r.x[keep], lo[keep], hi[keep])] + [np.asarray(s, float)[keep] for s in starts[:1]]
    r_ps = _best_of(resid_ps, ps_starts, lo[keep], hi[keep], max_nfev)
    chi2_ps = float(2.0 * r_ps.cost) if r_ps is not None else np.inf
    ln10 = np.log(10.0)
    if chi2_ps - chi2 < FINITE_SOURCE_MIN_DCHI2:
        cov = _covariance(r_ps, len(r_ps.x), chi2_ps, len(y) - len(r_ps.x))
        sd = np.insert(np.sqrt(np.clip(np.diag(cov), 0, None)), 3, np.nan)
        x = np.insert(r_ps.x, 3, -np.inf)
        chi2_used, success = chi2_ps, bool(r_ps.success)
    else:
        cov = _covariance(r, len(r.x), chi2, len(y) - len(r.x))
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        x = r.x
        chi2_used, success = chi2, bool(r.success)
    t0, te, u0, rho, base, fs = unpack(x)
    out.params = {"t0_s": t0, "te_s": te, "u0": u0, "rho": rho, "fs": fs, "base": base,
                  "delta_chi2_finite_source": chi2_ps - chi2}
    out.errors = {"t0_s": sd[0], "te_s": te * ln10 * sd[1], "u0": sd[2], "rho": rho * ln10 * sd[3],
                  "fs": sd[5] if fit_blend else 0.0, "base": sd[4]}
    out.params["peak_magnification"] = float(
        microlensing_magnification_curve(t0, t0, te, u0, rho)) if rho > 0 else float(point_source_magnification(u0))
    out.chi2 = chi2_used
    out.success = success
    return out


def fit_flare(t_s, y, err, *, t_guess, duration_guess, excess_guess, sample_s=0.54, supersample=3,
              max_nfev=200, fwhm_px=None, window=None) -> FitResult:
    """Fit the FRED flare model (see module docstring); ``params``: ``t0_s, amplitude, rise_s, decay_s, base``.

    Arguments as :func:`fit_microlensing` (``fwhm_px``, ``window``: PSF-smeared model).
    """
    base0, chi2_flat = fit_flat(y, err)
    dur = max(float(duration_guess), sample_s)
    exc = max(float(excess_guess), 1e-4)
    smear = _fit_smear(t_s, sample_s, fwhm_px, supersample, window, t_guess, dur)

    def resid(p):
        t0, amp, lr, ld, base = p
        return (flare_model(t_s, t0, amp, 10**lr, 10**ld, base, sample_s, supersample, smear=smear) - y) / err

    tmin, tmax = float(np.min(t_s)), float(np.max(t_s))
    lo = np.array([tmin - dur, 0.0, -2.0, -2.0, BASE_BOUNDS[0]])
    hi = np.array([tmax + dur, 100.0, 4.0, 4.5, BASE_BOUNDS[1]])
    t_start = t_guess - dur / 2.0
    starts = [
        [t_start + 0.1 * dur, 2.0 * exc, np.log10(max(0.05 * dur, 0.02)), np.log10(0.5 * dur), base0],
        [t_guess, 1.2 * exc, np.log10(0.3 * dur), np.log10(0.3 * dur), base0],
    ]
    r = _best_of(resid, starts, lo, hi, max_nfev)
    out = FitResult("flare", chi2_flat=chi2_flat, n=len(y))
    if r is None:
        return out
    chi2 = float(2.0 * r.cost)
    cov = _covariance(r, 5, chi2, len(y) - 5)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    t0, amp, lr, ld, base = r.x
    ln10 = np.log(10.0)
    out.params = {"t0_s": t0, "amplitude": amp, "rise_s": 10**lr, "decay_s": 10**ld, "base": base}
    out.errors = {"t0_s": sd[0], "amplitude": sd[1], "rise_s": 10**lr * ln10 * sd[2],
                  "decay_s": 10**ld * ln10 * sd[3], "base": sd[4]}
    out.chi2 = chi2
    out.success = bool(r.success)
    return out


def flash_profile(t_s, t0, fwhm_samples, sample_s, supersample=None):
    """Line-spread function of an instantaneous flash at ``t0`` as seen by drift samples (peak ~1).

    Moffat (:data:`LSF_BETA`) PSF of FWHM ``fwhm_samples`` pixels
    integrated across the drift, ``(1 + x^2 / alpha^2)^(1/2 - beta)`` with
    ``x`` the along-drift offset in pixels (one sample = one pixel), averaged
    over each sample's one-pixel strip (exactly: :func:`moffat_lsf_pixel`
    times the LSF's area ``4 alpha / 3``, so the peak is ~1). ``t0`` and
    ``fwhm_samples`` broadcast against ``t_s`` (e.g. ``t0`` of shape ``(G, 1)``
    gives ``(G, n)``). ``supersample`` is ignored (kept for compatibility).
    """
    x = (np.asarray(t_s, float) - np.asarray(t0, float)) / sample_s
    return moffat_lsf_pixel(x, fwhm_samples) * (4.0 / 3.0) * _moffat_alpha(fwhm_samples)


def fit_flash(t_s, y, err, *, t_lo, t_hi, fwhm_samples, sample_s=0.54, fwhm_range=(0.85, 1.2), t_step_samples=0.1,
              n_fwhm=5) -> FitResult:
    """Best flash model (see module docstring) with ``t0`` in ``[t_lo, t_hi]`` (s, same origin as ``t_s``).

    Parameters
    ----------
    t_s, y, err : ndarray
        Sample times (s), normalised fluxes and errors.
    t_lo, t_hi : float
        Range of flash instants tried.
    fwhm_samples : float
        FWHM of the flash on the image (pixels; one sample per pixel).
    fwhm_range : (float, float)
        FWHM tried, as factors of ``fwhm_samples`` (seeing changes over the
        exposure, measurement error of the width).

    Returns
    -------
    FitResult
        ``params``: ``t0_s, amplitude, fwhm_samples, base``; no errors.
    """
    y = np.asarray(y, float)
    w = 1.0 / np.asarray(err, float) ** 2
    base0, chi2_flat = fit_flat(y, err)
    out = FitResult("flash", chi2_flat=chi2_flat, n=len(y))
    if len(y) < 3 or not np.isfinite(fwhm_samples) or fwhm_samples <= 0:
        return out
    step = t_step_samples * sample_s
    t0 = np.arange(t_lo, t_hi + 0.5 * step, step) if t_hi > t_lo else np.array([0.5 * (t_lo + t_hi)])
    fw = fwhm_samples * np.linspace(fwhm_range[0], fwhm_range[1], n_fwhm)
    T0, FW = (a.ravel()[:, None] for a in np.meshgrid(t0, fw, indexing="ij"))
    p = flash_profile(t_s[None, :], T0, FW, sample_s)  # (G, n)
    # weighted linear least squares of y = base + amp * p, per grid point
    sw, sy = w.sum(), (w * y).sum()
    sp, spp, spy = p @ w, (p * p) @ w, p @ (w * y)
    det = sw * spp - sp * sp
    with np.errstate(all="ignore"):
        amp = (sw * spy - sp * sy) / det
        base = (sy - amp * sp) / sw
    neg = ~(amp > 0)
    amp[neg], base[neg] = 0.0, sy / sw
    syy = (w * y * y).sum()
    chi2 = syy - 2 * base * sy - 2 * amp * spy + base**2 * sw + 2 * base * amp * sp + amp**2 * spp
    k = int(np.nanargmin(chi2))
    out.params = {"t0_s": float(T0[k, 0]), "amplitude": float(amp[k]), "fwhm_samples": float(FW[k, 0]),
                  "base": float(base[k])}
    out.errors = {key: np.nan for key in out.params}
    out.chi2 = float(max(chi2[k], 0.0))
    out.success = True
    return out
