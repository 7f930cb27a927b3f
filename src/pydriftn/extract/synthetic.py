"""Small seeded synthetic drift trails with exact truth, for tests and benchmarks.

Independent of :mod:`pydriftn.simulate` on purpose: it renders exactly what
the extraction assumes nothing about — a Gaussian (or Gaussian-mixture) PSF
moving along an arbitrary direction, integrated finely in time and exactly
over pixels (error-function differences, separable per component), with a
common multiplicative pattern (transparency × along-track jitter), a common
cross-track jitter, time-varying seeing, per-star light curves, Poisson and
read noise, two amplifiers with different gains, cosmic rays and a bad column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import erf

from pydriftn.geometry import TrailGeometry

__all__ = ["SyntheticField", "make_geometry", "render_field"]

_SQRT2 = math.sqrt(2.0)


def make_geometry(length_px=37.0, exptime_s=20.0, angle_deg=180.0):
    """A :class:`TrailGeometry` moving ``length_px`` in ``exptime_s`` at ``angle_deg``."""
    th = math.radians(angle_deg)
    speed = length_px / exptime_s
    return TrailGeometry(
        direction=(math.cos(th), math.sin(th)),
        speed_px_s=speed,
        length_px=length_px,
        exptime_s=exptime_s,
        sample_dt_s=1.0 / speed,
        drift_rate_arcsec_s=(0.0, 0.5),
    )


@dataclass
class SyntheticField:
    """A rendered synthetic drift image and its truth."""

    image: np.ndarray  # ADU, sky kept
    mask: np.ndarray  # nonzero = bad
    trails: pd.DataFrame  # star_id, x_start, y_start, x_end, y_end, mag, counts_e
    geometry: TrailGeometry
    gain: tuple
    read_noise_e: tuple
    saturation_adu: tuple
    sky_e: float  # per pixel per exposure
    t_fine: np.ndarray  # fine time grid (s)
    common: np.ndarray  # common multiplicative pattern on t_fine (along jitter excluded)
    lightcurves: np.ndarray  # (n_stars, n_fine) star's own relative flux
    jitter_along: np.ndarray
    jitter_cross: np.ndarray
    sigma_px: np.ndarray  # Gaussian sigma on t_fine
    mjd_obs: float = 59000.0
    extras: dict = field(default_factory=dict)

    def true_sample_flux(self, k):
        """True mean flux (e-/s) of each star during sample(s) ``k`` (on-sky, with the
        common pattern and the star's light curve; before PSF smoothing)."""
        dt = self.geometry.sample_dt_s
        k = np.atleast_1d(k)
        idx = np.floor(self.t_fine / dt).astype(int)
        rate = self.trails["counts_e"].to_numpy()[:, None] / self.geometry.exptime_s
        f = rate * self.lightcurves * self.common[None, :]
        out = np.stack([f[:, idx == kk].mean(axis=1) for kk in k], axis=1)
        return out

    def true_relative(self, k, smooth_px=None):
        """Star's own relative light curve averaged over sample(s) ``k``, optionally
        smoothed by a Gaussian of ``smooth_px`` (along-track PSF response)."""
        dt = self.geometry.sample_dt_s
        k = np.atleast_1d(k)
        lc = self.lightcurves
        if smooth_px:
            t = self.t_fine
            sig_t = smooth_px * dt
            step = t[1] - t[0]
            half = int(math.ceil(4 * sig_t / step))
            ker = np.exp(-0.5 * (np.arange(-half, half + 1) * step / sig_t) ** 2)
            ker /= ker.sum()
            padded = np.pad(lc, ((0, 0), (half, half)), mode="edge")
            lc = np.stack([np.convolve(r, ker, mode="valid") for r in padded])
        idx = np.floor(self.t_fine / dt).astype(int)
        return np.stack([lc[:, idx == kk].mean(axis=1) for kk in k], axis=1)


def render_field(
    n_stars=60,
    shape=(300, 200),
    seed=1,
    geometry=None,
    mags=None,
    positions=None,
    zp=27.6,
    sky_e_s=40.0,
    fwhm_px=3.7,
    seeing_rms_frac=0.04,
    jitter_rms_px=0.2,
    transparency_rms=0.015,
    gain=(4.0, 3.9),
    read_noise_e=(6.5, 6.0),
    saturation_adu=(42000.0, 41000.0),
    lightcurves=None,
    n_cosmic=0,
    bad_columns=(),
    steps_per_px=12,
    mixture=((1.0, 1.0),),
    noise=True,
):
    """Render a synthetic drift image.

    Parameters
    ----------
    n_stars : int
        Stars (ignored when ``positions`` is given).
    shape : (ny, nx)
    geometry : TrailGeometry, optional
        Default: 37 px along -x in 20 s.
    mags : array, optional
        Magnitudes (counts_e = EXPTIME * 10**(0.4*(zp - mag))); default uniform 15-20.
    positions : array (n, 2), optional
        Trail start positions ``(x_start, y_start)``.
    lightcurves : callable or array, optional
        ``lightcurves(t_fine) -> (n_stars, n_fine)`` relative flux (default 1).
    mixture : sequence of (weight, sigma_scale)
        PSF as a sum of Gaussians (weights normalised); ``((1, 1),)`` is Gaussian.
    noise : bool
        Add Poisson and read noise.
    """
    rng = np.random.default_rng(seed)
    geo = geometry if geometry is not None else make_geometry()
    ny, nx = shape
    ux, uy = geo.direction
    vx, vy = geo.cross_direction
    L = geo.length_px
    T = geo.exptime_s
    if positions is None:
        margin = 14
        # place starts so that the whole trail is on the image
        xs0 = rng.uniform(margin + max(0, -ux * L), nx - margin - max(0, ux * L), n_stars)
        ys0 = rng.uniform(margin + max(0, -uy * L), ny - margin - max(0, uy * L), n_stars)
    else:
        positions = np.asarray(positions, dtype=float)
        n_stars = len(positions)
        xs0, ys0 = positions[:, 0], positions[:, 1]
    if mags is None:
        mags = rng.uniform(15.0, 20.0, n_stars)
    mags = np.asarray(mags, dtype=float)
    counts = T * 10 ** (0.4 * (zp - mags))

    n_fine = int(round(L * steps_per_px))
    t = (np.arange(n_fine) + 0.5) * T / n_fine
    dt_f = T / n_fine

    def ou(rms, tau):
        a = math.exp(-dt_f / tau)
        x = np.empty(n_fine)
        x[0] = rng.normal(0, rms)
        e = rng.normal(0, rms * math.sqrt(1 - a * a), n_fine)
        for i in range(1, n_fine):
            x[i] = a * x[i - 1] + e[i]
        return x

    jit_a = (ou(jitter_rms_px / _SQRT2, 0.3) + ou(jitter_rms_px / _SQRT2, 1.5)) if jitter_rms_px else np.zeros(n_fine)
    jit_c = (ou(jitter_rms_px / _SQRT2, 0.3) + ou(jitter_rms_px / _SQRT2, 1.5)) if jitter_rms_px else np.zeros(n_fine)
    transp = 1.0 + (ou(transparency_rms, 8.0) if transparency_rms else np.zeros(n_fine))
    sig0 = fwhm_px / 2.3548
    sigma = sig0 * (1.0 + (ou(seeing_rms_frac, 5.0) if seeing_rms_frac else np.zeros(n_fine)))
    if lightcurves is None:
        lc = np.ones((n_stars, n_fine))
    elif callable(lightcurves):
        lc = np.asarray(lightcurves(t), dtype=float)
    else:
        lc = np.asarray(lightcurves, dtype=float)
    # image positions: nominal drift + jitter
    s_al = geo.speed_px_s * t + jit_a
    X = xs0[:, None] + ux * s_al[None, :] + vx * jit_c[None, :]
    Y = ys0[:, None] + uy * s_al[None, :] + vy * jit_c[None, :]
    w = counts[:, None] * lc * transp[None, :] / n_fine  # e- per fine step

    img = np.full(shape, sky_e_s * T, dtype=np.float64)
    mix = np.asarray(mixture, dtype=float)
    mw = mix[:, 0] / mix[:, 0].sum()
    pad = int(math.ceil(6 * sig0 * mix[:, 1].max() * 1.3)) + 2
    for i in range(n_stars):
        x0 = max(int(math.floor(X[i].min())) - pad, 0)
        x1 = min(int(math.ceil(X[i].max())) + pad + 1, nx)
        y0 = max(int(math.floor(Y[i].min())) - pad, 0)
        y1 = min(int(math.ceil(Y[i].max())) + pad + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        ex = np.arange(x0, x1 + 1) - 0.5
        ey = np.arange(y0, y1 + 1) - 0.5
        stamp = 0.0
        for wk, sk in zip(mw, mix[:, 1]):
            s = (sigma * sk)[:, None] * _SQRT2
            gx = 0.5 * np.diff(erf((ex[None, :] - X[i][:, None]) / s), axis=1)
            gy = 0.5 * np.diff(erf((ey[None, :] - Y[i][:, None]) / s), axis=1)
            stamp = stamp + wk * ((gy * w[i][:, None]).T @ gx)
        img[y0:y1, x0:x1] += stamp
    mask = np.zeros(shape, dtype=np.uint16)
    cr_list = []
    for _ in range(int(n_cosmic)):
        cx, cy = rng.integers(0, nx), rng.integers(0, ny)
        e = rng.uniform(2000, 20000)
        img[cy, cx] += e
        cr_list.append((cx, cy, e))
    gains = np.where(np.arange(nx) < nx // 2, gain[0], gain[1])
    rns = np.where(np.arange(nx) < nx // 2, read_noise_e[0], read_noise_e[1])
    if noise:
        e_img = rng.poisson(np.maximum(img, 0)).astype(np.float64) + rng.normal(0, 1, shape) * rns[None, :]
    else:
        e_img = img
    adu = (e_img / gains[None, :]).astype(np.float32)
    sat = np.where(np.arange(nx) < nx // 2, saturation_adu[0], saturation_adu[1])
    adu = np.minimum(adu, sat[None, :]).astype(np.float32)
    for cx, cy, _e in cr_list:
        mask[cy, cx] = 5
    for col in bad_columns:
        adu[:, col] = rng.normal(0, 1000, ny)
        mask[:, col] = 1
    mask[adu >= sat[None, :]] = 3
    trails = pd.DataFrame(
        {
            "star_id": np.arange(n_stars, dtype=np.int64),
            "x_start": xs0,
            "y_start": ys0,
            "x_end": xs0 + ux * L,
            "y_end": ys0 + uy * L,
            "mag": mags,
            "counts_e": counts,
            "flags": np.zeros(n_stars, dtype=np.int64),
        }
    )
    return SyntheticField(
        image=adu,
        mask=mask,
        trails=trails,
        geometry=geo,
        gain=tuple(gain),
        read_noise_e=tuple(read_noise_e),
        saturation_adu=tuple(saturation_adu),
        sky_e=sky_e_s * T,
        t_fine=t,
        common=transp,
        lightcurves=lc,
        jitter_along=jit_a,
        jitter_cross=jit_c,
        sigma_px=sigma,
        extras={"cosmic_rays": cr_list, "counts_e": counts},
    )
