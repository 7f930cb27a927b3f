"""Local significance of a point source on top of an imperfect trail model.

The trail model (:mod:`._trailmodel`) is never exact: at a bright trail's
ends a sub-pixel error of the end position (shutter-open jitter, the
start from the trail table) leaves a dipole, and a few per cent error of the
end-cap shape or of the flux leaves a bump. Both are coherent over the PSF
footprint, so a per-pixel variance term underestimates them, and a point-
source matched filter on such a residual reports 7-15 sigma where there is
nothing but the star (false "flashes" that repeat on the same bright star in
every exposure).

Here each point candidate is fitted on its stamp by generalised least
squares with the PSF and the model's own error modes as nuisance columns:

``r = A P + b0 + b_s dM/ds + b_c dM/dc + b_f M + b_w sigma^2 lap(M) + noise``

with Gaussian priors on the nuisance amplitudes (``b_s``, ``b_c``: position
errors in px along / across the drift; ``b_f``: fractional flux error;
``b_w``: fractional width error; ``b0``: local background) and the per-pixel photon noise of sky + model.
``A / sigma(A)`` is the honest significance: on a plain sky or in the
interior of a trail (where ``dM/ds`` vanishes and ``dM/dc`` is antisymmetric
about the PSF) it equals the matched-filter S/N; next to a bright trail end
it is reduced by exactly as much as the PSF resembles a shift of the end.
The same fit with a Gaussian twice as wide as the PSF gives ``broad_ratio``
= S/N(wide) / S/N(PSF), 0.8 for a point source and >= 1 for a residual
broader than the PSF (end-cap wings, blends).
"""

from __future__ import annotations

import numpy as np

__all__ = ["local_point_fit"]


def _gather(img, ys, xs):
    ny, nx = img.shape
    ok = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
    v = np.zeros(ys.shape, dtype=np.float64)
    v[ok] = img[np.clip(ys, 0, ny - 1), np.clip(xs, 0, nx - 1)][ok]
    return v, ok


def local_point_fit(resid, model, bad, x, y, *, sigma_psf, sky_sigma, gain, direction, bkg=None,
                    pos_err_along=0.5, pos_err_cross=0.3, flux_err=0.05, width_err=0.03, bkg_err=None,
                    half_size=None, star_modes=None):
    """GLS point-source fit with the trail model's error modes as nuisances.

    Parameters
    ----------
    resid : ndarray (ny, nx)
        Image minus sky minus trail model (ADU), masked pixels arbitrary.
    model : ndarray (ny, nx)
        Trail model (ADU).
    bad : ndarray of bool or None
        Pixels without information (weight 0).
    x, y : ndarray
        Candidate positions (sub-pixel, 0-based).
    sigma_psf : float
        Gaussian sigma of the PSF (px).
    sky_sigma : float
        Sky noise per pixel (ADU).
    gain : float
        e-/ADU (photon noise of the model).
    direction : (ux, uy)
        Unit drift direction.
    bkg : ndarray, optional
        Local background per candidate (ADU per pixel) subtracted first.
    pos_err_along, pos_err_cross : float
        Prior rms of the model's position error along / across the drift (px).
    flux_err : float
        Prior rms of the model's fractional flux error.
    width_err : float
        Prior rms of the model's fractional PSF-width error (seeing at the
        instant of a trail end differs from the template's).
    bkg_err : float, optional
        Prior rms of the local background after the mesh (ADU); default 0.1
        sky sigma.
    half_size : int, optional
        Stamp half-size (px); default ``ceil(4 sigma_psf)``.
    star_modes : ndarray (n, K, 3, S, S), optional
        Per-trail model stamps ``F T``, ``F dT/ds``, ``F dT/dc`` of the K
        trails with the most light at each candidate (zeros where none), on
        the stamp of size ``S = 2 half_size + 1``: each trail's flux and
        position error becomes its own nuisance (blends of independently
        wrong trails). Without them the total model's modes are used.

    Returns
    -------
    snr : ndarray
        ``A / sigma(A)`` of the PSF amplitude.
    flux : ndarray
        ``A`` (ADU, total flux of the PSF).
    broad_ratio : ndarray
        S/N of a 2-sigma-wide Gaussian over the S/N of the PSF (same nuisances).
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    if n == 0:
        e = np.zeros(0)
        return e, e, e
    R = int(half_size if half_size is not None else np.ceil(4.0 * sigma_psf))
    o = np.arange(-R, R + 1)
    xi = np.rint(x).astype(np.int64)
    yi = np.rint(y).astype(np.int64)
    YS = yi[:, None, None] + o[None, :, None]
    XS = xi[:, None, None] + o[None, None, :]
    YS, XS = np.broadcast_arrays(YS, XS)
    r, ok = _gather(resid, YS, XS)
    # model on a stamp one pixel larger, for central differences
    o2 = np.arange(-R - 1, R + 2)
    Y2, X2 = np.broadcast_arrays(yi[:, None, None] + o2[None, :, None], xi[:, None, None] + o2[None, None, :])
    m2, _ = _gather(model, Y2, X2)
    M = m2[:, 1:-1, 1:-1]
    gx = 0.5 * (m2[:, 1:-1, 2:] - m2[:, 1:-1, :-2])
    gy = 0.5 * (m2[:, 2:, 1:-1] - m2[:, :-2, 1:-1])
    ux, uy = (float(v) for v in direction)
    gs = ux * gx + uy * gy
    gc = -uy * gx + ux * gy
    lap = m2[:, 1:-1, 2:] + m2[:, 1:-1, :-2] + m2[:, 2:, 1:-1] + m2[:, :-2, 1:-1] - 4.0 * M
    w = ok.astype(np.float64)
    if bad is not None:
        b, _ = _gather(bad, YS, XS)
        w *= b == 0
    if bkg is not None:
        r = r - np.asarray(bkg, float)[:, None, None]
    var = sky_sigma**2 + np.clip(M, 0.0, None) / gain
    w = w / var
    dx = XS - x[:, None, None]
    dy = YS - y[:, None, None]
    rr = dx * dx + dy * dy

    def gauss(s):
        return np.exp(-0.5 * rr / s**2) / (2.0 * np.pi * s**2)

    bkg_err = 0.1 * sky_sigma if bkg_err is None else float(bkg_err)
    # width error: M(sigma (1 + e)) - M(sigma) = e sigma^2 laplacian(M) for a Gaussian-smoothed model
    if star_modes is None:
        nuis = [np.ones_like(M), gs, gc, M, sigma_psf**2 * lap]
        tau = np.array([bkg_err, pos_err_along, pos_err_cross, flux_err, width_err])
    else:
        # the total model's width mode, and per trail: flux, along shift, cross shift
        sm = np.asarray(star_modes, float)
        nuis = [np.ones_like(M), sigma_psf**2 * lap]
        tau = [bkg_err, width_err]
        for kk in range(sm.shape[1]):
            nuis += [sm[:, kk, 0], sm[:, kk, 1], sm[:, kk, 2]]
            tau += [flux_err, pos_err_along, pos_err_cross]
        tau = np.array(tau)
    out = []
    # design matrix (n, npix, k): the nuisance columns are filled once, only the Gaussian changes
    X = np.empty((n, M[0].size, 1 + len(nuis)))
    for kk, c in enumerate(nuis):
        X[:, :, 1 + kk] = c.reshape(n, -1)
    for s in (sigma_psf, 2.0 * sigma_psf):
        X[:, :, 0] = gauss(s).reshape(n, -1)
        W = w.reshape(n, -1)
        XtW = X.transpose(0, 2, 1) * W[:, None, :]
        A = XtW @ X
        k = X.shape[2]
        lam = np.zeros(k)
        lam[1:] = 1.0 / tau**2
        A = A + np.eye(k)[None] * lam[None, :, None]
        A[:, 0, 0] += 1e-12 * np.maximum(A[:, 0, 0], 1e-30)
        bvec = XtW @ r.reshape(n, -1, 1)
        cov = np.linalg.inv(A)
        beta = (cov @ bvec)[..., 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = beta[:, 0] / np.sqrt(cov[:, 0, 0])
        out.append((np.nan_to_num(snr), beta[:, 0]))
    (snr_p, flux_p), (snr_w, _) = out
    with np.errstate(divide="ignore", invalid="ignore"):
        broad = np.where(snr_p > 0, snr_w / snr_p, np.inf)
    return snr_p, flux_p, broad
