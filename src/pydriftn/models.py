"""Light-curve models: point-lens microlensing (point and finite source) and flares.

Pure numpy/scipy, vectorised over arrays of times, impact parameters and source
sizes (everything broadcasts).

Microlensing
------------
The point-lens, point-source (Paczynski 1986) magnification is

.. math:: A_{\\rm PS}(u) = \\frac{u^2 + 2}{u\\sqrt{u^2 + 4}}.

For a **uniform** source disk of radius :math:`\\rho` (in Einstein radii) at
separation :math:`u` from the lens we use the exact closed form of Witt & Mao
(1994, ApJ 430, 505, eq. 9) in terms of the complete elliptic integrals of the
first, second and third kind (with the K/E roles as corrected in MulensModel):

.. math::

    \\pi A = \\frac{(u+\\rho)\\sqrt{4+(u-\\rho)^2}}{2\\rho^2} E(m)
           - \\frac{(u-\\rho)(8+u^2-\\rho^2)}{2\\rho^2\\sqrt{4+(u-\\rho)^2}} K(m)
           + \\frac{2(u-\\rho)^2(1+\\rho^2)}{\\rho^2(u+\\rho)\\sqrt{4+(u-\\rho)^2}} \\Pi(n, m),

with :math:`n = 4u\\rho/(u+\\rho)^2` and parameter
:math:`m = k^2 = 4n/(4+(u-\\rho)^2)`. ``K`` and ``E`` come from
:func:`scipy.special.ellipk`/:func:`~scipy.special.ellipe`; the third kind is
evaluated with Carlson's symmetric forms,
:math:`\\Pi(n, m) = R_F(0, 1-m, 1) + \\tfrac{n}{3} R_J(0, 1-m, 1, 1-n)`.
Special regimes:

* ``u == rho`` (the lens on the limb): :math:`\\Pi` diverges as
  :math:`(1-n)^{-1/2}` while its coefficient vanishes as :math:`(u-\\rho)^2`;
  the limit is :math:`A = [2/u + (1+u^2)(\\pi/2 + \\arcsin\\frac{u^2-1}{u^2+1})/u^2]/\\pi`
  (evaluated as :math:`2\\arctan u` for the bracketed angle).
  Near (not at) the limb the Carlson form is accurate (the product is finite).
* ``u == 0``: :math:`A = \\sqrt{1 + 4/\\rho^2}` (exact formula, used directly).
* ``rho -> 0`` or ``u >> rho``: the three terms of the closed form are
  :math:`O(u/\\rho^2)` and cancel to :math:`O(1/u)`, losing
  :math:`\\sim 2\\log_{10}(u/\\rho)` digits, and the elliptic integrals are
  the expensive part of the evaluation. Where ``u > 10 rho`` we therefore use
  the disk-average Taylor expansion
  :math:`\\langle A\\rangle = A + \\frac{\\rho^2}{8}\\nabla^2 A + \\frac{\\rho^4}{192}\\nabla^4 A
  + \\frac{\\rho^6}{9216}\\nabla^6 A` (closed-form Laplacians; relative
  truncation error ~2e-10 at ``u = 10 rho``, falling as :math:`(\\rho/u)^8`);
  ``rho == 0`` gives Paczynski.
* ``rho >> 1``: the closed form is well conditioned
  (:math:`A \\to 1 + 2/\\rho^2` inside the source).

Linear limb darkening, :math:`I(r) \\propto 1 - \\Gamma(1 - \\tfrac32\\sqrt{1 - r^2/\\rho^2})`
(the MulensModel ``gamma`` convention), is obtained by integrating the uniform
solution over annuli: writing :math:`F(r) = r^2 A_U(u, r)` and integrating by
parts with :math:`s = \\sqrt{1 - r^2/\\rho^2}`,

.. math:: A_{\\Gamma} = (1-\\Gamma) A_U(u, \\rho)
          + \\tfrac32\\Gamma \\int_0^1 (1-s^2)\\, A_U(u, \\rho\\sqrt{1-s^2})\\, ds,

evaluated with Gauss-Legendre quadrature (``n_ld`` nodes, default 48; the
integrand is smooth except for the logarithmic kink at the limb crossing, the
error is ~1e-4 relative there and far smaller elsewhere).

Why our own code: the finite-source point lens is the core of the event model,
evaluated millions of times inside the least-squares fits of the event search;
MulensModel evaluates the Witt & Mao formula point by point in a Python loop
(with sympy for the third-kind integral and interpolation tables), which is
orders of magnitude too slow for that and not vectorised. MulensModel is used
as the reference in the tests.

Flares
------
:func:`fred_flare` is a two-sided exponential "fast rise, exponential decay"
profile (fractional flux excess): ``amplitude * exp((t - t0)/rise_s)`` for
``t < t0`` and ``amplitude * exp(-(t - t0)/decay_s)`` for ``t >= t0``; it
peaks at ``t0`` with value ``amplitude``.

Times in :func:`microlensing_magnification_curve` etc. are in any unit as long
as ``t``, ``t0`` and ``tE`` (and ``rise_s``/``decay_s``) share it; the event
search uses seconds.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import special

__all__ = [
    "point_source_magnification",
    "finite_source_magnification",
    "microlensing_magnification_curve",
    "microlensing_flux",
    "fred_flare",
    "flat",
]

log = logging.getLogger(__name__)

#: ``u / rho`` above which the Taylor expansion replaces the closed form.
SERIES_U_OVER_RHO = 10.0


def point_source_magnification(u):
    """Point-lens point-source (Paczynski) magnification.

    Parameters
    ----------
    u : array_like
        Lens-source separation in Einstein radii (>= 0).

    Returns
    -------
    numpy.ndarray or float
        ``(u**2 + 2) / (u * sqrt(u**2 + 4))``; ``inf`` at ``u == 0``.
    """
    u = np.abs(np.asarray(u, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        u2 = u * u
        a = (u2 + 2.0) / (u * np.sqrt(u2 + 4.0))
    a = np.where(u == 0.0, np.inf, a)
    return a[()] if a.ndim == 0 else a


def _ps_laplacian_terms(u):
    """2-D Laplacians ``lap^k A``, k = 1, 2, 3, of the Paczynski magnification at ``u``.

    For the radial function ``A(u) = (u^2+2)/(u sqrt(u^2+4))`` (derived with
    sympy, ``lap f = f'' + f'/u``)::

        lap A   = 32 (u^2 + 1) / (u^3 (u^2+4)^(5/2))
        lap^2 A = 384 (3u^6 + 6u^4 + 14u^2 + 12) / (u^5 (u^2+4)^(9/2))
        lap^3 A = 36864 (2u^10 + 2u^8 + 22u^6 + 57u^4 + 82u^2 + 50) / (u^7 (u^2+4)^(13/2))
    """
    u = np.asarray(u, dtype=float)
    u2 = u * u
    q = u2 + 4.0
    lap1 = 32.0 * (u2 + 1.0) / (u2 * u * q**2.5)
    lap2 = 384.0 * (3.0 * u2**3 + 6.0 * u2 * u2 + 14.0 * u2 + 12.0) / (u2 * u2 * u * q**4.5)
    lap3 = 36864.0 * (((((2.0 * u2 + 2.0) * u2 + 22.0) * u2 + 57.0) * u2 + 82.0) * u2 + 50.0) / (
        u2**3 * u * q**6.5)
    return lap1, lap2, lap3


def _uniform_closed_form(u, rho):
    """Witt & Mao (1994) closed form; ``u``, ``rho`` 1-D float arrays, ``u != rho``, ``rho > 0``."""
    d = u - rho
    s = u + rho
    q = np.sqrt(4.0 + d * d)
    rho2 = rho * rho
    d2 = d * d
    n = 4.0 * u * rho / (s * s)
    # complements computed without cancellation (they -> 0 at the limb u = rho):
    # 1 - n = d^2/s^2 and 1 - m = d^2 (1 + 4/s^2) / (4 + d^2)
    p = d2 / (s * s)
    y = d2 * (1.0 + 4.0 / (s * s)) / (4.0 + d2)
    kk = special.ellipkm1(y)
    ee = special.ellipe(1.0 - y)
    # Pi(n, m) = R_F(0, 1-m, 1) + n/3 R_J(0, 1-m, 1, 1-n)
    with np.errstate(divide="ignore", invalid="ignore"):
        pi3 = special.elliprf(0.0, y, 1.0) + n / 3.0 * special.elliprj(0.0, y, 1.0, p)
    a1 = 0.5 * s * q / rho2
    a2 = -d * (8.0 + u * u - rho2) / (2.0 * rho2 * q)
    a3 = 2.0 * d * d * (1.0 + rho2) / (rho2 * s * q)
    return (a1 * ee + a2 * kk + a3 * pi3) / np.pi


def _uniform_limb(u):
    """Limit of the closed form at ``u == rho`` (lens on the source limb)."""
    # pi/2 + arcsin((u^2-1)/(u^2+1)) == 2 arctan(u), without the cancellation at small u
    u2 = u * u
    a = 2.0 * np.arctan(u)
    return (2.0 / u + (1.0 + u2) * a / u2) / np.pi


def _uniform_series(u, rho):
    """Disk-average Taylor expansion for ``u >> rho`` (to order ``rho^6``).

    The mean of a function over a uniform disk of radius ``rho`` is
    ``sum_k (rho^2/4)^k / (k! (k+1)!) lap^k A``.
    """
    lap1, lap2, lap3 = _ps_laplacian_terms(u)
    r2 = rho * rho
    u2 = u * u
    a_ps = (u2 + 2.0) / (u * np.sqrt(u2 + 4.0))
    return a_ps + r2 / 8.0 * lap1 + r2 * r2 / 192.0 * lap2 + r2**3 / 9216.0 * lap3


def _uniform(u, rho):
    """Exact uniform-disk magnification for broadcast 1-D arrays ``u >= 0``, ``rho >= 0``."""
    out = np.empty_like(u)
    point = rho == 0.0
    series = ~point & (u > SERIES_U_OVER_RHO * rho)
    centre = ~point & (u == 0.0)
    limb = ~point & ~series & (u == rho)
    closed = ~(point | series | centre | limb)
    if point.any():
        out[point] = point_source_magnification(u[point])
    if series.any():
        out[series] = _uniform_series(u[series], rho[series])
    if centre.any():
        r = rho[centre]
        out[centre] = np.sqrt(1.0 + 4.0 / (r * r))
    if limb.any():
        out[limb] = _uniform_limb(u[limb])
    if closed.any():
        out[closed] = _uniform_closed_form(u[closed], rho[closed])
    return out


def finite_source_magnification(u, rho, method="exact", gamma=0.0, n_ld=48):
    """Point-lens magnification of a finite (uniform or limb-darkened) source disk.

    Our own vectorised implementation of the exact Witt & Mao (1994) closed form
    (see the module docstring for the formula, the special regimes and why we
    do not call MulensModel here).

    Parameters
    ----------
    u : array_like
        Lens-source separation in Einstein radii (>= 0; the sign is ignored).
    rho : array_like
        Angular source radius in Einstein radii (>= 0; 0 means point source).
        Broadcasts with ``u``.
    method : {"exact", "point"}
        ``"exact"``: Witt & Mao closed form (with the limits described in the
        module docstring). ``"point"``: ignore ``rho`` (Paczynski).
    gamma : float, optional
        Linear limb-darkening coefficient (MulensModel convention,
        ``I ∝ 1 - gamma (1 - 1.5 sqrt(1 - r²/rho²))``); 0 = uniform disk.
    n_ld : int, optional
        Gauss-Legendre nodes of the annulus integral used when ``gamma != 0``.

    Returns
    -------
    numpy.ndarray or float
        Magnification, same shape as ``broadcast(u, rho)``.

    Raises
    ------
    ValueError
        If ``rho`` is negative or NaN-free inputs are inconsistent, or
        ``method`` is unknown.
    """
    u = np.abs(np.asarray(u, dtype=float))
    rho = np.asarray(rho, dtype=float)
    if method == "point":
        return point_source_magnification(u)
    if method != "exact":
        raise ValueError(f"finite_source_magnification: method must be 'exact' or 'point', got {method!r}")
    if np.any(rho < 0):
        raise ValueError("finite_source_magnification: rho must be >= 0 (source radius in Einstein radii)")
    ub, rb = np.broadcast_arrays(u, rho)
    shape = ub.shape
    uf = ub.ravel().astype(float)
    rf = rb.ravel().astype(float)
    good = np.isfinite(uf) & np.isfinite(rf)
    out = np.full(uf.shape, np.nan)
    if gamma == 0.0:
        out[good] = _uniform(uf[good], rf[good])
    else:
        x, w = np.polynomial.legendre.leggauss(int(n_ld))
        s = 0.5 * (x + 1.0)  # nodes on [0, 1]
        w = 0.5 * w
        ug, rg = uf[good], rf[good]
        base = _uniform(ug, rg)
        r_nodes = rg[:, None] * np.sqrt(1.0 - s[None, :] ** 2)
        a_nodes = _uniform(np.broadcast_to(ug[:, None], r_nodes.shape).ravel(), r_nodes.ravel())
        a_nodes = a_nodes.reshape(r_nodes.shape)
        integral = (a_nodes * (1.0 - s**2)[None, :] * w[None, :]).sum(axis=1)
        out[good] = (1.0 - gamma) * base + 1.5 * gamma * integral
    out = out.reshape(shape)
    return out[()] if out.ndim == 0 else out


def microlensing_magnification_curve(t, t0, tE, u0, rho=0.0, gamma=0.0):
    """Magnification versus time of a point-lens event (finite source if ``rho > 0``).

    Parameters
    ----------
    t : array_like
        Times (same unit as ``t0``, ``tE``).
    t0 : float or array_like
        Time of closest approach.
    tE : float or array_like
        Einstein-radius crossing time (> 0).
    u0 : float or array_like
        Impact parameter in Einstein radii.
    rho : float or array_like, optional
        Source radius in Einstein radii (0 = point source).
    gamma : float, optional
        Linear limb-darkening coefficient (0 = uniform).

    Returns
    -------
    numpy.ndarray
        ``A(t)`` with ``u(t) = sqrt(u0**2 + ((t - t0)/tE)**2)``.
    """
    t = np.asarray(t, dtype=float)
    tau = (t - t0) / tE
    u = np.sqrt(np.asarray(u0, dtype=float) ** 2 + tau * tau)
    return finite_source_magnification(u, rho, gamma=gamma)


def microlensing_flux(t, t0, tE, u0, rho, f_source, f_blend, gamma=0.0):
    """Flux of a lensed source plus unlensed blend: ``f_source * A(t) + f_blend``.

    For normalised light curves (baseline 1) use ``f_source = fs`` and
    ``f_blend = 1 - fs``.

    Parameters
    ----------
    t, t0, tE, u0, rho, gamma
        See :func:`microlensing_magnification_curve`.
    f_source : float
        Flux of the lensed source.
    f_blend : float
        Unlensed flux in the same aperture.

    Returns
    -------
    numpy.ndarray
    """
    return f_source * microlensing_magnification_curve(t, t0, tE, u0, rho, gamma=gamma) + f_blend


def fred_flare(t, t0, amplitude, rise_s, decay_s):
    """Fast-rise exponential-decay flare, as a fractional flux excess.

    ``amplitude * exp((t - t0) / rise_s)`` for ``t < t0`` and
    ``amplitude * exp(-(t - t0) / decay_s)`` for ``t >= t0`` (peak ``amplitude``
    at ``t0``). The model light curve of a flaring star is ``1 + fred_flare``.

    Parameters
    ----------
    t : array_like
        Times in seconds.
    t0 : float
        Time of peak.
    amplitude : float
        Peak fractional excess.
    rise_s, decay_s : float
        e-folding times of the rise and of the decay (> 0).

    Returns
    -------
    numpy.ndarray
    """
    t = np.asarray(t, dtype=float)
    dt = t - t0
    rise = max(float(rise_s), 1e-12)
    decay = max(float(decay_s), 1e-12)
    with np.errstate(over="ignore"):
        shape = np.where(dt < 0, np.exp(np.minimum(dt, 0.0) / rise), np.exp(-np.maximum(dt, 0.0) / decay))
    return amplitude * shape


def flat(t, level=1.0):
    """Constant model: ``level`` at every time (the null hypothesis of the search)."""
    t = np.asarray(t, dtype=float)
    return np.full(t.shape, float(level))
