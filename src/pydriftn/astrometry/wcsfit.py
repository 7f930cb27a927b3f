"""Fit a TAN-SIP WCS to matched pixel and sky positions.

The fit is linear: sky positions are projected gnomonically about a
reference point to standard coordinates ``(xi, eta)``, which are fitted as
polynomials of the pixel offsets from a reference pixel by weighted linear
least squares. The linear terms are the CD matrix, the higher ones become SIP
``A``/``B`` coefficients, the constant term moves the tangent point (iterated
until it vanishes), and the inverse ``AP``/``BP`` polynomials are fitted on a
grid. The SIP order is chosen by BIC among ``0..max_order`` (0 = pure TAN)
unless given; outliers are clipped on normalised residuals.

We do this instead of :func:`astropy.wcs.utils.fit_wcs_from_points` because
that routine runs a generic non-linear optimiser over all parameters, is
~50× slower for a thousand stars, takes no per-star weights, and does not
choose the SIP order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs import WCS

from ..errors import AstrometryError
from ..geometry import offset_sky

log = logging.getLogger(__name__)

__all__ = ["WCSFit", "fit_tan_sip", "tangent_plane"]

_DEG = 180.0 / math.pi


def tangent_plane(ra, dec, ra0, dec0):
    """Gnomonic standard coordinates ``(xi, eta)`` in degrees about ``(ra0, dec0)``."""
    a = np.radians(np.asarray(ra, float))
    d = np.radians(np.asarray(dec, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    ca = np.cos(a - a0)
    den = np.sin(d) * math.sin(d0) + np.cos(d) * math.cos(d0) * ca
    xi = np.cos(d) * np.sin(a - a0) / den
    eta = (np.sin(d) * math.cos(d0) - np.cos(d) * math.sin(d0) * ca) / den
    return xi * _DEG, eta * _DEG


def _terms(order, min_order=0):
    return [(i, k - i) for k in range(min_order, order + 1) for i in range(k, -1, -1)]


def _design(u, v, order):
    return np.stack([u**i * v**j for i, j in _terms(order)], axis=1)


@dataclass
class WCSFit:
    """Result of :func:`fit_tan_sip`.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
    sip_order : int
        0 for pure TAN.
    used : ndarray of bool
        Stars kept after clipping.
    resid_x_arcsec, resid_y_arcsec : ndarray
        Residuals (fit minus data) of all stars, in the tangent plane (arcsec).
    rms_arcsec : float
        2-D rms residual of the used stars.
    bic : dict
        BIC per order tried.
    """

    wcs: WCS
    sip_order: int
    used: np.ndarray
    resid_xi_arcsec: np.ndarray
    resid_eta_arcsec: np.ndarray
    rms_arcsec: float
    bic: dict = field(default_factory=dict)

    @property
    def n_used(self) -> int:
        return int(self.used.sum())


def _solve_poly(u, v, xi, eta, w, order):
    A = _design(u, v, order)
    sw = np.sqrt(w)[:, None]
    cx, *_ = np.linalg.lstsq(A * sw, xi * sw[:, 0], rcond=None)
    cy, *_ = np.linalg.lstsq(A * sw, eta * sw[:, 0], rcond=None)
    return cx, cy, A


def fit_tan_sip(x, y, ra, dec, *, sigma_px=None, ref_pixel, ref_sky, order=None, max_order=3,
                clip_sigma=5.0, n_clip=3, shape=None, min_stars=6, ref_cd=None, stars_per_param=10):
    """Fit a TAN(-SIP) WCS.

    Parameters
    ----------
    x, y : array_like
        0-based pixel positions.
    ra, dec : array_like
        Sky positions (deg) of the same points.
    sigma_px : array_like, optional
        Position errors (pixels) for weights.
    ref_pixel : (float, float)
        0-based reference pixel (becomes CRPIX - 1), e.g. the CCD centre.
    ref_sky : (float, float)
        First guess of the sky position at ``ref_pixel``.
    order : int, optional
        SIP order; ``None`` chooses by BIC up to ``max_order``, considering a
        distortion of order >= 2 only with at least ``stars_per_param`` stars
        per fitted coefficient (trail positions along the drift have heavy
        tails, which would otherwise buy spurious high orders).
    shape : (ny, nx), optional
        Image shape (for ``pixel_shape`` and the inverse-SIP grid).
    ref_cd : (2, 2) array, optional
        CD matrix to keep when there are too few stars (< 9) for a linear fit:
        only the tangent point is fitted then (sparse fields).

    Raises
    ------
    AstrometryError
        Fewer than ``min_stars`` usable stars.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ra = np.asarray(ra, float)
    dec = np.asarray(dec, float)
    n = x.size
    if ref_cd is not None and 2 <= n < max(min_stars, 9):
        return _fit_shift_only(x, y, ra, dec, ref_pixel, ref_sky, np.asarray(ref_cd, float), shape)
    if n < min_stars:
        raise AstrometryError(f"WCS fit: {n} matched stars, at least {min_stars} needed")
    s = np.full(n, 0.05) if sigma_px is None else np.hypot(np.asarray(sigma_px, float), 0.02)
    w = 1.0 / s**2
    x0, y0 = float(ref_pixel[0]), float(ref_pixel[1])
    u = x - x0
    v = y - y0
    scale = max(np.abs(u).max(), np.abs(v).max(), 1.0)
    un, vn = u / scale, v / scale
    used = np.isfinite(u + v + ra + dec)
    crval = np.array(ref_sky, float)
    orders = [order] if order is not None else list(range(0, max_order + 1))
    bic = {}
    best = None
    for it in range(n_clip + 1):
        for _ in range(3):  # move the tangent point until the constant term vanishes
            xi, eta = tangent_plane(ra, dec, crval[0], crval[1])
            cx, cy, _ = _solve_poly(un[used], vn[used], xi[used], eta[used], w[used], 1)
            ra_c, dec_c = offset_sky(crval[0], crval[1], cx[0] * 3600.0, cy[0] * 3600.0)
            crval = np.array([float(ra_c), float(dec_c)])
            if math.hypot(cx[0], cy[0]) * 3600 < 1e-6:
                break
        xi, eta = tangent_plane(ra, dec, crval[0], crval[1])
        bic = {}
        fits = {}
        nu = int(used.sum())
        for o in orders:
            po = max(o, 1)
            nterm = len(_terms(po))
            if nu < 2 * nterm + 3:
                continue
            if order is None and po >= 2 and nu < stars_per_param * 2 * nterm:
                continue  # too few stars to constrain a distortion reliably
            cx, cy, _ = _solve_poly(un[used], vn[used], xi[used], eta[used], w[used], po)
            A = _design(un, vn, po)
            rx = A @ cx - xi
            ry = A @ cy - eta
            rss = float(((rx**2 + ry**2) * w)[used].sum())
            bic[o] = 2 * nu * math.log(max(rss / (2 * nu), 1e-300)) + 2 * nterm * math.log(2 * nu)
            fits[o] = (cx, cy, rx, ry)
        if not fits:
            raise AstrometryError(f"WCS fit: {nu} stars left after clipping, too few for the model")
        best = min(fits, key=lambda o: bic[o])
        cx, cy, rx, ry = fits[best]
        if it == n_clip:
            break
        norm = np.hypot(rx, ry) * 3600.0 / (s * _pix_scale_arcsec(cx, cy, scale))
        med = np.median(norm[used])
        mad = 1.4826 * np.median(np.abs(norm[used] - med))
        lim = max(med + clip_sigma * max(mad, 0.3), 3.0)
        new_used = used & (norm < lim)
        if new_used.sum() == used.sum():
            break
        used = new_used
    po = max(best, 1)
    for _ in range(5):  # tangent point of the chosen model: constant term -> 0
        xi, eta = tangent_plane(ra, dec, crval[0], crval[1])
        cx, cy, _ = _solve_poly(un[used], vn[used], xi[used], eta[used], w[used], po)
        if math.hypot(cx[0], cy[0]) * 3600 < 1e-7:
            break
        ra_c, dec_c = offset_sky(crval[0], crval[1], cx[0] * 3600.0, cy[0] * 3600.0)
        crval = np.array([float(ra_c), float(dec_c)])
    A = _design(un, vn, po)
    rx = A @ cx - xi
    ry = A @ cy - eta
    terms = _terms(po)
    cxs = np.array([c / scale ** (i + j) for c, (i, j) in zip(cx, terms)])
    cys = np.array([c / scale ** (i + j) for c, (i, j) in zip(cy, terms)])
    cd = np.array([[cxs[1], cxs[2]], [cys[1], cys[2]]])  # terms order: (0,0), (1,0), (0,1), ...
    wcs = WCS(naxis=2)
    wcs.wcs.crpix = [x0 + 1.0, y0 + 1.0]
    wcs.wcs.crval = [crval[0], crval[1]]
    wcs.wcs.cd = cd
    if best >= 2:
        cdinv = np.linalg.inv(cd)
        a = np.zeros((best + 1, best + 1))
        b = np.zeros((best + 1, best + 1))
        for k, (i, j) in enumerate(terms):
            if i + j < 2:
                continue
            fg = cdinv @ np.array([cxs[k], cys[k]])
            a[i, j] = fg[0]
            b[i, j] = fg[1]
        ap, bp = _inverse_sip(a, b, best, x0, y0, shape, scale)
        from astropy.wcs import Sip

        wcs.sip = Sip(a, b, ap, bp, [x0 + 1.0, y0 + 1.0])
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    else:
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.set()
    if shape is not None:
        wcs.pixel_shape = (int(shape[1]), int(shape[0]))
    # residuals with the final WCS, in arcsec in the tangent plane
    rxa, rya = rx * 3600.0, ry * 3600.0
    rms = float(np.sqrt(np.mean(rxa[used] ** 2 + rya[used] ** 2)))
    log.debug("WCS fit: order %d, %d/%d stars, rms %.4f arcsec, BIC %s", best, used.sum(), n, rms, bic)
    return WCSFit(wcs=wcs, sip_order=int(best), used=used, resid_xi_arcsec=rxa, resid_eta_arcsec=rya,
                  rms_arcsec=rms, bic=bic)


def _fit_shift_only(x, y, ra, dec, ref_pixel, ref_sky, cd, shape):
    """Fit only the sky position of the reference pixel, keeping the CD matrix."""
    x0, y0 = float(ref_pixel[0]), float(ref_pixel[1])
    crval = np.array(ref_sky, float)
    uv = np.c_[x - x0, y - y0]
    for _ in range(5):
        xi, eta = tangent_plane(ra, dec, crval[0], crval[1])
        pred = uv @ cd.T
        off = np.median(np.c_[xi, eta] - pred, axis=0)
        r0, d0 = offset_sky(crval[0], crval[1], off[0] * 3600.0, off[1] * 3600.0)
        crval = np.array([float(r0), float(d0)])
    xi, eta = tangent_plane(ra, dec, crval[0], crval[1])
    pred = uv @ cd.T
    rx = (pred[:, 0] - xi) * 3600.0
    ry = (pred[:, 1] - eta) * 3600.0
    wcs = WCS(naxis=2)
    wcs.wcs.crpix = [x0 + 1.0, y0 + 1.0]
    wcs.wcs.crval = list(crval)
    wcs.wcs.cd = cd
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.set()
    if shape is not None:
        wcs.pixel_shape = (int(shape[1]), int(shape[0]))
    used = np.ones(x.size, bool)
    log.warning("WCS fit: only %d stars; fitted the pointing only (CD matrix kept)", x.size)
    return WCSFit(wcs=wcs, sip_order=0, used=used, resid_xi_arcsec=rx, resid_eta_arcsec=ry,
                  rms_arcsec=float(np.sqrt(np.mean(rx**2 + ry**2))), bic={})


def _pix_scale_arcsec(cx, cy, scale):
    return math.sqrt(abs(cx[1] * cy[2] - cx[2] * cy[1])) / scale * 3600.0


def _inverse_sip(a, b, order, x0, y0, shape, scale):
    """Fit the inverse SIP polynomials AP, BP (one order higher) on a grid."""
    ext = scale if shape is None else max(shape)
    g = np.linspace(-ext, ext, 41)
    uu, vv = np.meshgrid(g, g)
    uu, vv = uu.ravel(), vv.ravel()
    f = np.zeros_like(uu)
    gq = np.zeros_like(uu)
    for i in range(order + 1):
        for j in range(order + 1 - i):
            if a[i, j]:
                f += a[i, j] * uu**i * vv**j
            if b[i, j]:
                gq += b[i, j] * uu**i * vv**j
    U = uu + f
    V = vv + gq
    po = order + 1
    terms = _terms(po)
    Un, Vn = U / ext, V / ext
    A = np.stack([Un**i * Vn**j for i, j in terms], axis=1)
    cu, *_ = np.linalg.lstsq(A, uu - U, rcond=None)
    cv, *_ = np.linalg.lstsq(A, vv - V, rcond=None)
    ap = np.zeros((po + 1, po + 1))
    bp = np.zeros((po + 1, po + 1))
    for k, (i, j) in enumerate(terms):
        ap[i, j] = cu[k] / ext ** (i + j)
        bp[i, j] = cv[k] / ext ** (i + j)
    return ap, bp
